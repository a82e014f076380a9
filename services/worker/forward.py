"""A worker's forwards and the cache surgery around them.

Greedy decoding calls the model exactly like ``transformers`` ``generate`` does (same
``input_ids`` slices, all-ones 2-D ``attention_mask``, ``use_cache=True``, ``logits_to_keep=1``,
a lazily-fed last token), so the committed output of repeated NextText/UpdateState is bitwise
what ``model.generate(do_sample=False)`` produces. Every forward of a session goes through the
step batcher (``batching.py``): alone it is that exact call; while other sessions of the worker
are generating it may share one batched forward with theirs (same greedy picks, float noise),
and idle sessions' continuations may ride along (``Fill``).

Caches are rolled back by cropping, never copied, except where scoring needs the committed
prefix beside the session's own cache (``committed_copy``).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable

import grpc

from ..common.errors import CoolFusionError
from . import logits as ops
from .batching import StepBatcher
from .logits import Logits
from .sessions import Session

_COMPUTE_LOCKS_GUARD = threading.Lock()
# Tokens per prefill forward. A cancelled Open stops within one chunk, so this bounds how long a
# cancel waits (docs/performance.md, *Constants*).
PREFILL_CHUNK = 128
Cancelled = Callable[[], bool]  # asked between chunks: stop now?


class PrefillCancelled(CoolFusionError):
    """The caller left while its context was prefilled (CANCELLED)."""

    code = grpc.StatusCode.CANCELLED


def compute_lock(model) -> threading.Lock:
    """The lock of one model object, shared by every core that holds it (in-process replicas get
    the cached model): a batched forward switches the model's attention implementation for its
    call, so no other forward of that model may run meanwhile."""
    with _COMPUTE_LOCKS_GUARD:
        lock = model.__dict__.get("_coolfusion_compute_lock")
        if lock is None:
            lock = threading.Lock()
            model.__dict__["_coolfusion_compute_lock"] = lock
        return lock


class Forwards:
    """Every forward of one worker's model, whatever runs it (the backend interface; transformers
    in ``transformers_backend.py``, llama.cpp in ``llamacpp.py``). A backend gives ``new_cache``
    (a KV cache with the part of ``DynamicCache``'s API the worker uses: ``get_seq_length``,
    ``crop``, ``batch_repeat_interleave``, ``batch_select_indices``, ``copy.deepcopy``),
    ``forward`` (rows of equal length on a cache), ``_single_step`` and ``_batched_step`` (the
    step batcher's lone and batched forwards), ``batcher`` and ``inference``; prefilling, running
    a session's step and readying its next logits are shared. Logits are the backend's own arrays
    (torch tensors, numpy arrays), which ``logits.py`` does the arithmetic on. ``run`` goes through the step batcher, so that a session's forward may
    share one batched forward with other sessions' (``max_batch`` rows at most; 1 turns batching
    off). ``fill(n)``: up to ``n`` idle sessions' steps to top a batch up with (``fill_rows``)."""

    backend = ""
    # A few more rows in a forward cost little (transformers: the weights are read once for all),
    # so prompt lookup may put guessed tokens in forwards that are due anyway.
    cheap_rows = True
    prefill_chunk = PREFILL_CHUNK
    batcher: StepBatcher

    def new_cache(self):
        raise NotImplementedError

    def forward(self, rows: list[list[int]], cache, keep_last: bool) -> Logits:
        raise NotImplementedError

    def _single_step(self, cache, tokens: list[int], logits_from: int) -> Logits:
        raise NotImplementedError

    def _batched_step(self, caches: list, rows: list[list[int]], logits_from: list[int]) -> list[Logits]:
        raise NotImplementedError

    def inference(self) -> contextlib.AbstractContextManager:
        """The context forwards and the arithmetic on their logits run in: torch's inference mode
        on transformers, nothing where the logits are plain arrays."""
        return contextlib.nullcontext()

    @property
    def restore_align(self) -> int:
        """A prefill resumes from a restored cache only at multiples of this many tokens: where
        chunks of a whole prefill end, so that the rest is computed as a whole prefill would."""
        return max(1, self.prefill_chunk)

    def prefill(
        self, ids: list[int], cache=None, cancelled: Cancelled | None = None, done: int = 0
    ) -> tuple[object, Logits]:
        """A cache holding ``ids`` (``cache``, or a new one) and the float32 logits after them.

        Chunks of ``prefill_chunk`` tokens, one forward each, called the way ``generate`` calls
        them with ``prefill_chunk_size`` (a prompt of one chunk: its plain call). ``done``: the
        tokens ``cache`` already holds (the prefix cache's start, a multiple of ``restore_align``). Between chunks
        ``cancelled()`` is asked and ``PrefillCancelled`` raised when it says so: a caller that
        left stops the work within one chunk, and other sessions' steps get the model between."""
        cache = self.new_cache() if cache is None else cache
        step = max(1, self.prefill_chunk)
        assert done % self.restore_align == 0 and done < len(ids), (
            "a prefill resumes at a boundary before its last token"
        )
        with self.inference():
            for start in range(done, len(ids), step):
                if start > done and cancelled is not None and cancelled():
                    raise PrefillCancelled(f"prefill cancelled after {start} of {len(ids)} tokens")
                logits = self.forward([ids[start : start + step]], cache, keep_last=True)
        return cache, ops.float32(logits[0, -1], copy=True)

    def run(self, cache, tokens: list[int], logits_from: int | None = None, owner=None) -> Logits:
        """One session's forward of ``tokens``, alone or in a batch (``StepBatcher.run``)."""
        return self.batcher.run(cache, tokens, logits_from, owner=owner)

    def ready(self, s: Session) -> Logits:
        """Next logits of the committed state, forwarding a committed-but-unfed last token first."""
        if s.fed < len(s.ids):
            assert s.lookahead == 0, "unfed committed tokens with lookahead in the cache"
            # One forward, alone or sharing a batch with other sessions' forwards.
            s.next_logits = self.run(s.cache, s.ids[s.fed :], owner=s.id)[0]
            s.fed = len(s.ids)
        return s.next_logits


class Fill:
    """A step of an idle session's greedy continuation added to a batch (``batching.Fill``); the
    session stays locked from ``fill_rows`` until ``release``."""

    def __init__(self, session: Session):
        self.session = session
        self.cache = session.cache
        self.token = session.ahead_tokens[-1]

    def done(self, logits: Logits) -> None:
        s = self.session
        s.ahead_logits.append(logits)
        s.lookahead += 1
        s.pick(logits)

    def release(self) -> None:
        self.session.lock.release()


def fill_rows(sessions: list[Session], n: int, eos: frozenset, max_positions: int | None) -> list[Fill]:
    """Up to ``n`` idle sessions whose greedy continuation may grow by a step (``Fill``, locked).

    Only right after a NextText (``fill_until``): every committed token is in the cache, the
    continuation's last pick is not forwarded yet and is no EOS."""
    fills = []
    for s in sessions:
        if len(fills) == n:
            break
        if len(s.ahead_tokens) >= s.fill_until or not s.lock.acquire(blocking=False):
            continue
        ready = (
            not s.closed
            and len(s.ahead_tokens) < s.fill_until
            and s.fed == len(s.ids)
            and len(s.ahead_tokens) == len(s.ahead_logits) + 1 == s.lookahead + 1
            and s.ahead_tokens[-1] not in eos
            and (not max_positions or len(s.ids) + s.lookahead + 1 < max_positions)
        )
        if ready:
            fills.append(Fill(s))
        else:
            s.lock.release()
    return fills


def crop_tail(cache, tokens: int) -> None:
    """Remove the last ``tokens`` states of every layer. Unlike ``crop(-tokens)``, sliding
    layers keep all the states they hold (the kept lookahead must stay croppable)."""
    if hasattr(cache, "crop_tail"):  # a backend's own cache (llama.cpp: positions removed)
        cache.crop_tail(tokens)
        return
    for layer in getattr(cache, "layers", ()):
        if not getattr(layer, "is_initialized", False):
            continue
        if getattr(layer, "is_sliding", False) and hasattr(layer, "cumulative_length"):
            layer.keys = layer.keys[..., :-tokens, :]
            layer.values = layer.values[..., :-tokens, :]
            layer.cumulative_length -= tokens
        else:
            layer.crop(-tokens)


def trim(s: Session) -> None:
    """After a commit: sliding-window layers keep window - 1 states plus the kept lookahead
    (so that it can still be cropped away), like ``crop(0)`` does without lookahead."""
    if not s.lookahead:
        s.cache.crop(0)
        return
    for layer in getattr(s.cache, "layers", ()):
        window = getattr(layer, "sliding_window", None)
        if not getattr(layer, "is_sliding", False) or not window or not getattr(layer, "is_initialized", False):
            continue
        keep = window - 1 + s.lookahead
        if layer.keys.shape[-2] > keep:
            layer.keys = layer.keys[:, :, -keep:, :]
            layer.values = layer.values[:, :, -keep:, :]


def committed_copy(s: Session):
    """A copy of the session cache holding exactly the committed tokens."""
    cache = copy.deepcopy(s.cache)
    if s.lookahead:
        cache.crop(-s.lookahead)
    return cache
