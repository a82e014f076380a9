"""The prefix cache: the KV caches of recently prefilled contexts, so that an Open whose context
starts like one of them prefills only the rest (few-shot prompts, an eval's modes over one
question, a client retrying).

Exact, not approximate: a worker prefills in chunks of ``chunk`` tokens from position 0
(``forward.py``), and a cache restored at a chunk boundary then prefilled on holds the very
tensors a whole prefill holds. Full-attention layers only concatenate; sliding-window layers
(Gemma-3) record every state while prefilling and attend to the last window of them, so a
recorded cache cut at the boundary is the cache a prefill of that many tokens leaves. The logits
of an Open served from here are therefore bitwise those of a whole prefill; only caches holding
every state of their context are kept (``store`` checks it).

On the llama.cpp backend an entry is a sequence of the worker's context, and a restore is a new
sequence sharing the entry's cells (``SequenceKV.cut``): the restored states are the very ones
the first prefill computed, at any length, so there restores need no chunk boundary. What is
prefilled after them lands in other cells than a whole prefill's would, which moves llama.cpp's
logits by the same layout noise as any session decoded beside others (``llamacpp.py``).

Entries are never handed out, only copies: a session crops and grows its own cache.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass

from . import logits as ops
from .logits import Logits
from .sessions import cache_bytes


@dataclass(frozen=True)
class Restored:
    """What an Open starts from: ``cache`` holds the first ``tokens`` ids of its context; when
    those are all of them, ``logits`` are the logits after the last one (else None)."""

    cache: object
    tokens: int
    logits: Logits | None


@dataclass
class _Entry:
    ids: tuple[int, ...]
    cache: object
    logits: Logits
    nbytes: int


def _common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    if tuple(b[:n]) == a[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tuple(b[lo:mid]) == a[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _holds_every_state(cache, n: int) -> bool:
    """Every layer holds exactly ``n`` states (none dropped out of a sliding window)."""
    if hasattr(cache, "holds_every_state"):  # llama.cpp's SequenceKV
        return cache.holds_every_state(n)
    layers = [layer for layer in getattr(cache, "layers", ()) if getattr(layer, "is_initialized", False)]
    return bool(layers) and all(
        layer.keys.shape[-2] == n and getattr(layer, "cumulative_length", n) == n for layer in layers
    )


def _cut(cache, n: int):
    """A copy of ``cache`` (holding every state) holding its first ``n`` states: the deep copy
    takes each layer's first ``n`` states in place of the whole tensors, copied once."""
    if hasattr(cache, "cut"):  # llama.cpp's SequenceKV: shares the cells, copies nothing
        return cache.cut(n)
    layers = [layer for layer in getattr(cache, "layers", ()) if getattr(layer, "is_initialized", False)]
    memo = {id(t): t[..., :n, :].clone() for layer in layers for t in (layer.keys, layer.values)}
    out = copy.deepcopy(cache, memo)
    for layer in getattr(out, "layers", ()):
        if getattr(layer, "is_initialized", False) and hasattr(layer, "cumulative_length"):
            layer.cumulative_length = n
    return out


class PrefixCache:
    """Caches of prefilled contexts, least recently used dropped beyond ``budget_bytes``
    (0: off) or ``max_entries`` (None: no cap). Restores start at a multiple of ``chunk``
    tokens; contexts shorter than ``min_tokens`` (default: ``chunk``) are not kept.
    Thread-safe; copies are made outside the lock."""

    def __init__(self, budget_bytes: int, chunk: int, min_tokens: int | None = None, max_entries: int | None = None):
        self.budget_bytes = max(0, int(budget_bytes))
        self.chunk = max(1, int(chunk))
        self.min_tokens = self.chunk if min_tokens is None else max(1, int(min_tokens))
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0  # Opens that started from a kept cache
        self.reused_tokens = 0  # context tokens those Opens did not prefill

    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def drop_oldest(self) -> bool:
        """Drop the least recently used entry (its cells go back to a llama.cpp context once no
        session shares them); False when there is none."""
        with self._lock:
            if not self._entries:
                return False
            self._entries.popitem(last=False)
            return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def restore(self, ids: list[int]) -> Restored | None:
        """The longest usable start for a context of ``ids``: a kept context equal to it (cache
        and logits), else a kept one sharing at least a chunk with it, cut at the last chunk
        boundary before its last token (the prefill must still give the logits)."""
        if not self.budget_bytes:
            return None
        with self._lock:
            best, best_n = None, 0
            for entry in reversed(self._entries.values()):  # most recent first
                common = _common_prefix(entry.ids, ids)
                if common == len(ids) == len(entry.ids):
                    best, best_n = entry, common
                    break
                usable = min(common, len(ids) - 1) // self.chunk * self.chunk
                if usable > best_n:
                    best, best_n = entry, usable
            if best is None:
                return None
            self._entries.move_to_end(best.ids)
            self.hits += 1
            self.reused_tokens += best_n
        cache = copy.deepcopy(best.cache) if best_n == len(best.ids) else _cut(best.cache, best_n)
        return Restored(cache, best_n, ops.clone(best.logits) if best_n == len(ids) else None)

    def store(self, ids: list[int], cache, logits: Logits) -> bool:
        """Keep a copy of a freshly prefilled ``cache`` of ``ids`` and the logits after them;
        False when it is not kept (off, shorter than ``min_tokens``, a layer that dropped states, or
        larger than the whole budget)."""
        key = tuple(ids)
        if not self.budget_bytes or len(key) < self.min_tokens:
            return False
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
        if not _holds_every_state(cache, len(key)):
            return False
        kept, kept_logits = copy.deepcopy(cache), ops.clone(logits)
        entry = _Entry(key, kept, kept_logits, cache_bytes(kept) + ops.nbytes(kept_logits))
        if entry.nbytes > self.budget_bytes:
            return False
        with self._lock:
            self._entries[key] = entry
            used = sum(e.nbytes for e in self._entries.values())
            while used > self.budget_bytes or (self.max_entries is not None and len(self._entries) > self.max_entries):
                _, dropped = self._entries.popitem(last=False)
                used -= dropped.nbytes
        return True
