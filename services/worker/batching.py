"""Batching the decode steps of concurrent sessions into one forward.

A decode step of a small model on CPU (or any model on a GPU) costs about the same for one row as
for several: the time goes into reading the weights. So when several sessions of one worker are
generating at once, their next-token steps run as one forward with a row per session.

``StepBatcher`` is a group commit: a thread that needs a step queues it; if no batch is running it
becomes the leader, waits up to ``gather_s`` for the other sessions that are generating (each is
usually between two steps, in a boundary check) and for those that queued a forward in the last
``recent_s``: under load a session spends much of a segment outside its generation loop (scoring,
commit, RPCs, waiting for the other models) and is back within a forward's time, and a forward
for one row reads every weight for one session. Then it runs every queued step in one forward and
hands each thread its logits. Alone, a session never waits: a batch of one (with no idle session
to fill it) is the plain forward, so single-session output stays bitwise what ``generate`` gives.
docs/performance.md has the measurements behind both waits.

Filling: a batch costs little more with a few rows added (the weights are read once), so when
``fill`` is given the leader tops a batch of real steps up with steps of idle sessions (``Fill``:
sessions waiting for the other models, whose kept greedy continuation grows by one token; their
next NextText replays it).

``forward_sessions`` runs the batch without building a batch-wide KV cache: the linear layers
(nearly all of the cost) take the rows as one matrix, and attention runs row by row, each row on
its own session's cache, through the lone step's own cache update and sdpa call. Stacking the
caches into one left-padded tensor instead copied every session's whole cache several times per
step (46 % of a SmolLM2 step at 8 sessions). Rows of a batch may differ from a lone forward in the
last bits of float rounding (different matrix shapes); greedy picks match.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .config import WORKER

log = logging.getLogger(__name__)


def batchable(cache) -> bool:
    """A cache made of per-layer states (``cache.layers``) can take part in a batched step."""
    return bool(getattr(cache, "layers", None))


# The attention implementation a batched step runs under (``forward_sessions``): each row attends
# over its own session's cache, so no batch-wide KV tensor is ever built.
ROWS_ATTENTION = "coolfusion_session_rows"


class _RowStates:
    """The key (or value) states of a batch's rows, one tensor per session (what the attention of
    that session's lone forward would get), with each row's span of the flattened tokens and its
    attention mask (None for one token: it sees every state it is given)."""

    __slots__ = ("tensors", "spans", "masks")

    def __init__(self, tensors: list[torch.Tensor], spans: list[tuple[int, int]], masks: list):
        self.tensors, self.spans, self.masks = tensors, spans, masks


def _rows_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention of each row's tokens on its own session's states: the sdpa call of that
    session's lone forward, row by row, over the flattened tokens (query: [1, heads, T, dim])."""
    if not isinstance(key, _RowStates):  # not a batched forward: plain sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = [
        sdpa_attention_forward(module, query[:, :, start : start + count], k, v, mask, **kwargs)[0]
        for (start, count), k, v, mask in zip(key.spans, key.tensors, value.tensors, key.masks)
    ]
    return torch.cat(outputs, 1), None


AttentionInterface.register(ROWS_ATTENTION, _rows_attention)


def _row_mask(states: int, count: int, window: int | None, device) -> torch.Tensor | None:
    """Bool mask [1, 1, count, states] of ``count`` new tokens at the end of ``states`` states:
    causal, and within ``window`` positions on a sliding layer (what the model's own mask gives)."""
    if count == 1:
        return None
    q = torch.arange(states - count, states, device=device)[:, None]
    kv = torch.arange(states, device=device)[None, :]
    allowed = kv <= q
    if window:
        allowed &= kv > q - window
    return allowed[None, None]


class _SessionRows(Cache):
    """The cache of a batched forward: ``update`` hands each row's new states to its session's own
    cache layer (the update its lone forward would make) and returns every row's states."""

    def __init__(self, caches: list, spans: list[tuple[int, int]]):
        super().__init__(layers=caches[0].layers)  # layer facts (sliding or not) for the model
        self.caches, self.spans = caches, spans
        self._masks: dict = {}  # (states, tokens, window) -> mask: the same for every layer of a kind

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values, masks = [], [], []
        for cache, (start, count) in zip(self.caches, self.spans):
            layer = cache.layers[layer_idx]
            k, v = layer.update(key_states[:, :, start : start + count], value_states[:, :, start : start + count])
            keys.append(k)
            values.append(v)
            window = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
            key = (k.shape[-2], count, window)
            if key not in self._masks:
                self._masks[key] = _row_mask(*key, k.device)
            masks.append(self._masks[key])
        return _RowStates(keys, self.spans, masks), _RowStates(values, self.spans, masks)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are given per token


def forward_sessions(model, caches: list, rows: list[list[int]], logits_from: list[int], device) -> list[torch.Tensor]:
    """One forward of ``rows[i]`` (one or more tokens) on ``caches[i]`` for every i, as one batch.

    The rows' tokens go in flattened (no padding); returns, per row, float32 logits after each of
    its tokens from index ``logits_from[i]`` on. Each cache has its row's tokens appended. The
    caller holds the model for itself (the attention implementation is switched for the call)."""
    ids, positions, keep, spans = [], [], [], []
    for cache, tokens, first in zip(caches, rows, logits_from):
        start, past = len(ids), cache.get_seq_length()
        ids += tokens
        positions += range(past, past + len(tokens))
        keep += range(start + first, start + len(tokens))
        spans.append((start, len(tokens)))
    config = model.config
    saved = config._attn_implementation
    config._attn_implementation = ROWS_ATTENTION
    try:
        out = model(
            input_ids=torch.tensor([ids], dtype=torch.long, device=device),
            # A 4-D mask is taken as prepared: the model builds none (rows get theirs in attention).
            attention_mask=torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device),
            position_ids=torch.tensor([positions], dtype=torch.long, device=device),
            past_key_values=_SessionRows(caches, spans),
            use_cache=True,
            return_dict=True,
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=device),
        )
    finally:
        config._attn_implementation = saved
    logits = out.logits[0].to(dtype=torch.float32)
    return list(logits.split([len(r) - f for r, f in zip(rows, logits_from)]))


@dataclass
class _Step:
    cache: object
    tokens: list[int]
    logits_from: int
    logits: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False


class Fill(Protocol):
    """A one-token step of an idle session added to a batch; ``release`` is always called, after
    ``done`` (only when the forward succeeded)."""

    cache: object
    token: int

    def done(self, logits: torch.Tensor) -> None: ...

    def release(self) -> None: ...


@dataclass
class BatchStats:
    batches: int = 0
    steps: int = 0
    tokens: int = 0  # tokens of the real steps (a row may carry several)
    filled: int = 0  # idle sessions' steps added to batches (``fill``)
    sizes: dict = field(default_factory=dict)  # batch size -> count


class StepBatcher:
    """Group commit of forwards of sessions. ``single(cache, tokens, logits_from)`` runs one
    session's forward alone (the exact ``generate`` call); ``many(caches, rows, logits_from)`` a
    batched one (``forward_sessions``). ``max_batch=1`` turns batching off."""

    def __init__(
        self,
        single: Callable[[object, list[int], int], torch.Tensor],
        many: Callable[[list, list[list[int]], list[int]], list[torch.Tensor]],
        max_batch: int = WORKER.max_batch,
        gather_s: float = 0.020,
        recent_s: float = 0.5,
        on_batch: Callable[[int], None] | None = None,
        fill: Callable[[int], list[Fill]] | None = None,
    ):
        self.single = single
        self.many = many
        self.max_batch = max(1, int(max_batch))
        self.gather_s = gather_s
        self.recent_s = recent_s
        self.on_batch = on_batch
        self.fill = fill
        self.stats = BatchStats()
        self._cv = threading.Condition()
        self._queue: list[_Step] = []
        self._running = False
        self._generating = 0  # sessions inside a generation loop: the batch a leader waits for
        self._last_step: dict = {}  # owner -> monotonic time of its last queued forward

    # A generation loop announces itself so that a leader knows how many steps to wait for.
    def __enter__(self):
        with self._cv:
            self._generating += 1
        return self

    def __exit__(self, *exc):
        with self._cv:
            self._generating -= 1
            self._cv.notify_all()

    @property
    def under_load(self) -> bool:
        """Other sessions are generating: a step queued now is likely to share a batch."""
        return self.max_batch > 1 and self._generating >= 2

    def _expected(self, now: float) -> int:
        """How many forwards a leader waits for: every session in a generation loop, and every
        session that queued one in the last ``recent_s`` (under load a session spends most of a
        segment outside the generation loop, in scoring, commits and RPCs, and comes back within
        a forward's time)."""
        horizon = now - self.recent_s
        for owner in [o for o, t in self._last_step.items() if t < horizon]:
            del self._last_step[owner]
        return min(max(self._generating, len(self._last_step)), self.max_batch)

    def forget(self, owner) -> None:
        """``owner`` will queue no more forwards (its session closed): no leader waits for it."""
        with self._cv:
            self._last_step.pop(owner, None)

    def run(self, cache, tokens: list[int], logits_from: int | None = None, owner=None) -> torch.Tensor:
        """Forward ``tokens`` on ``cache``, alone or in a batch with other sessions' forwards;
        returns float32 logits after each token from index ``logits_from`` (default: the last).
        ``owner`` names the session (a leader waits for sessions that stepped recently)."""
        first = len(tokens) - 1 if logits_from is None else logits_from
        if self.max_batch == 1:
            return self.single(cache, tokens, first)
        me = _Step(cache, list(tokens), first)
        with self._cv:
            if owner is not None:
                self._last_step[owner] = time.monotonic()
            self._queue.append(me)
            self._cv.notify_all()
            while not me.done:
                if self._running:
                    self._cv.wait()
                    continue
                # Lead: wait briefly for the other generating or recently stepping sessions.
                self._running = True
                now = time.monotonic()
                deadline, expected = now + self.gather_s, self._expected(now)
                while len(self._queue) < expected:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                self._cv.release()
                try:
                    self._run(batch)
                finally:
                    self._cv.acquire()
                    self._running = False
                    self._cv.notify_all()
        if me.error is not None:
            raise me.error
        return me.logits

    def _run(self, batch: list[_Step]) -> None:
        extras: list[Fill] = []
        if self.fill is not None and len(batch) < self.max_batch:
            try:
                extras = self.fill(self.max_batch - len(batch))
            except Exception:  # filling is an optimisation: the real steps run regardless
                log.exception("picking idle sessions to fill a batch failed")
        logits: list[torch.Tensor] = []
        try:
            if len(batch) + len(extras) == 1:
                logits = [self.single(batch[0].cache, batch[0].tokens, batch[0].logits_from)]
            else:
                caches = [r.cache for r in batch] + [e.cache for e in extras]
                rows = [r.tokens for r in batch] + [[e.token] for e in extras]
                firsts = [r.logits_from for r in batch] + [0] * len(extras)
                logits = [t.clone() for t in self.many(caches, rows, firsts)]
            for s, row in zip(batch, logits):
                s.logits = row
        except BaseException as exc:  # every waiting session gets the error, none hangs
            logits = []
            for s in batch:
                s.error = exc
        for e, row in zip(extras, logits[len(batch) :]):
            try:
                e.done(row[0])
            except Exception:
                log.exception("a filled step could not be kept")
        for e in extras:
            e.release()
        for s in batch:
            s.done = True
        n = len(batch) + len(extras)
        self.stats.batches += 1
        self.stats.steps += len(batch)
        self.stats.tokens += sum(len(r.tokens) for r in batch)
        self.stats.filled += len(extras)
        self.stats.sizes[n] = self.stats.sizes.get(n, 0) + 1
        if self.on_batch is not None:
            self.on_batch(n)
