"""Batching the decode steps of concurrent sessions into one forward (issue 5, item 6).

A decode step of a small model on CPU (or any model on a GPU) costs about the same for one row as
for several: the time goes into reading the weights. So when several sessions of one worker are
generating at once, their next-token steps run as one forward with a row per session.

``StepBatcher`` is a group commit: a thread that needs a step queues it; if no batch is running it
becomes the leader, waits up to ``gather_s`` (20 ms) for the other sessions that are generating
(each is usually between two steps, in a boundary check; measured at 8 clients, 2 cores: 4 ms
24.5-26.2 tokens/s, 10 ms 26.8-27.0, 20 ms 26.8-28.4), then runs every queued step in one forward and
hands each thread its logits. Alone, a session never waits: a batch of one (with no idle session
to fill it) is the plain forward, so single-session output stays bitwise what ``generate`` gives.

Filling: a batch costs little more with a few rows added (the weights are read once), so when
``fill`` is given the leader tops a batch of real steps up with steps of idle sessions (``Fill``:
sessions waiting for the other models, whose kept greedy continuation grows by one token; their
next NextText replays it).

``forward_sessions`` runs the batch without building a batch-wide KV cache: the linear layers
(nearly all of the cost) take the rows as one matrix, and attention runs row by row, each row on
its own session's cache, through the lone step's own cache update and sdpa call. Stacking the
caches into one left-padded tensor instead copied every session's whole cache three times per
step (stack, padding, the batch cache's append) plus once more to hand the new states back:
at 8 sessions of 200-340 cached tokens that was 46 % of a SmolLM2 step and 28 % of a Gemma-3
one (8 rows, one thread: 247 -> 164 ms and 248 -> 193 ms). Rows of a batch may differ from a
lone forward in the last bits of float rounding (different matrix shapes); greedy picks match.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

log = logging.getLogger(__name__)


def batchable(cache) -> bool:
    """A cache made of per-layer states (``cache.layers``) can take part in a batched step."""
    return bool(getattr(cache, "layers", None))


# The attention implementation a batched step runs under (``forward_sessions``): each row attends
# over its own session's cache, so no batch-wide KV tensor is ever built.
ROWS_ATTENTION = "coolfusion_session_rows"


class _RowStates:
    """The key (or value) states of a batch's rows, one tensor per session: what the attention
    of a lone step of that session would get."""

    __slots__ = ("tensors",)

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors


def _rows_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention of each row on its own session's states: the lone step's sdpa call, row by row."""
    outputs = [
        sdpa_attention_forward(module, query[b : b + 1], k, v, None, **kwargs)[0]
        for b, (k, v) in enumerate(zip(key.tensors, value.tensors))
    ]
    return torch.cat(outputs, 0), None


AttentionInterface.register(ROWS_ATTENTION, _rows_attention)


class _SessionRows(Cache):
    """The cache of a batched step: ``update`` hands row b's new states to session b's own cache
    layer (the update its lone step would make) and returns every row's states."""

    def __init__(self, caches: list):
        super().__init__(layers=caches[0].layers)  # layer facts (sliding or not) for the model
        self.caches = caches

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = [], []
        for b, cache in enumerate(self.caches):
            k, v = cache.layers[layer_idx].update(key_states[b : b + 1], value_states[b : b + 1])
            keys.append(k)
            values.append(v)
        return _RowStates(keys), _RowStates(values)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are given per row


def forward_sessions(model, caches: list, tokens: list[int], device) -> torch.Tensor:
    """One decode step of ``tokens[i]`` on ``caches[i]`` for every i, as one batched forward.

    Returns float32 next-token logits, one row per session; each cache has its step appended.
    The caller holds the model for itself (the attention implementation is switched for the call)."""
    rows = len(caches)
    config = model.config
    saved = config._attn_implementation
    config._attn_implementation = ROWS_ATTENTION
    try:
        out = model(
            input_ids=torch.tensor([[t] for t in tokens], dtype=torch.long, device=device),
            # A 4-D mask is taken as prepared: the model builds none (each row sees its whole cache).
            attention_mask=torch.ones((rows, 1, 1, 1), dtype=torch.bool, device=device),
            position_ids=torch.tensor([[c.get_seq_length()] for c in caches], dtype=torch.long, device=device),
            past_key_values=_SessionRows(caches),
            use_cache=True,
            return_dict=True,
            logits_to_keep=1,
        )
    finally:
        config._attn_implementation = saved
    return out.logits[:, -1].to(dtype=torch.float32)


@dataclass
class _Step:
    cache: object
    token: int
    logits: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False


class Fill(Protocol):
    """A step of an idle session added to a batch; ``release`` is always called, after ``done``
    (only when the forward succeeded)."""

    cache: object
    token: int

    def done(self, logits: torch.Tensor) -> None: ...

    def release(self) -> None: ...


@dataclass
class BatchStats:
    batches: int = 0
    steps: int = 0
    filled: int = 0  # idle sessions' steps added to batches (``fill``)
    sizes: dict = field(default_factory=dict)  # batch size -> count


class StepBatcher:
    """Group commit of decode steps. ``single(cache, token)`` runs a lone step (the exact
    ``generate`` call); ``many(caches, tokens)`` a batched one. ``max_batch=1`` turns batching off."""

    def __init__(
        self,
        single: Callable[[object, int], torch.Tensor],
        many: Callable[[list, list[int]], torch.Tensor],
        max_batch: int = 8,
        gather_s: float = 0.020,
        on_batch: Callable[[int], None] | None = None,
        fill: Callable[[int], list[Fill]] | None = None,
    ):
        self.single = single
        self.many = many
        self.max_batch = max(1, int(max_batch))
        self.gather_s = gather_s
        self.on_batch = on_batch
        self.fill = fill
        self.stats = BatchStats()
        self._cv = threading.Condition()
        self._queue: list[_Step] = []
        self._running = False
        self._generating = 0  # sessions inside a generation loop: the batch a leader waits for

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

    def step(self, cache, token: int) -> torch.Tensor:
        if self.max_batch == 1:
            return self.single(cache, token)
        me = _Step(cache, token)
        with self._cv:
            self._queue.append(me)
            self._cv.notify_all()
            while not me.done:
                if self._running:
                    self._cv.wait()
                    continue
                # Lead: wait briefly for the other generating sessions to queue their steps.
                self._running = True
                deadline = time.monotonic() + self.gather_s
                while len(self._queue) < min(self._generating, self.max_batch):
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
                logits = [self.single(batch[0].cache, batch[0].token)]
            else:
                rows = [*batch, *extras]
                out = self.many([r.cache for r in rows], [r.token for r in rows])
                logits = [out[i].clone() for i in range(len(rows))]
            for s, row in zip(batch, logits):
                s.logits = row
        except BaseException as exc:  # every waiting session gets the error, none hangs
            logits = []
            for s in batch:
                s.error = exc
        for e, row in zip(extras, logits[len(batch) :]):
            try:
                e.done(row)
            except Exception:
                log.exception("a filled step could not be kept")
        for e in extras:
            e.release()
        for s in batch:
            s.done = True
        n = len(batch) + len(extras)
        self.stats.batches += 1
        self.stats.steps += len(batch)
        self.stats.filled += len(extras)
        self.stats.sizes[n] = self.stats.sizes.get(n, 0) + 1
        if self.on_batch is not None:
            self.on_batch(n)
