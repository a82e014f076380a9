"""The prefix cache's bookkeeping over plain tensors (no model): which kept context an Open starts
from, where it is cut, the byte budget, and that no copy handed out aliases a kept cache.
Bitwise equality with whole prefills is checked on the bundled models in ``test_worker_core``."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from coolfusion.services.worker.prefix_cache import PrefixCache

CHUNK = 4
HEADS, DIM = 2, 3


def prefilled(ids: list[int], sliding: bool = False):
    """A cache-like object holding one state per id (the state's values are the id)."""
    states = torch.tensor(ids, dtype=torch.float32).view(1, 1, -1, 1).expand(1, HEADS, -1, DIM).contiguous()
    layer = SimpleNamespace(is_initialized=True, keys=states.clone(), values=-states.clone())
    if sliding:
        layer.cumulative_length = len(ids)
    return SimpleNamespace(layers=[layer])


def held(cache) -> list[int]:
    return [int(v) for v in cache.layers[0].keys[0, 0, :, 0]]


def entry_bytes(n: int, vocab: int = 5) -> int:
    return 2 * HEADS * n * DIM * 4 + vocab * 4


def test_start_from_the_longest_kept_prefix_cut_at_a_chunk_boundary():
    kept = PrefixCache(10**6, CHUNK)
    a = list(range(1, 12))  # 11 tokens
    assert kept.restore(a) is None
    assert kept.store(a, prefilled(a, sliding=True), torch.arange(5.0))
    # The same context: the whole cache and the logits after it.
    same = kept.restore(a)
    assert same.tokens == 11 and held(same.cache) == a and same.logits.tolist() == [0, 1, 2, 3, 4]
    # 9 tokens in common: cut at 8, the prefill gives the rest and the logits.
    b = a[:9] + [99, 98]
    start = kept.restore(b)
    assert start.tokens == 8 and held(start.cache) == a[:8] and start.logits is None
    assert start.cache.layers[0].cumulative_length == 8 and start.cache.layers[0].values.shape[-2] == 8
    # A context that is a kept one's prefix still keeps a token to prefill.
    assert kept.restore(a[:8]).tokens == 4
    # Less than a chunk in common: nothing to start from.
    assert kept.restore(a[:3] + [7, 7, 7, 7]) is None
    assert kept.hits == 3 and kept.reused_tokens == 11 + 8 + 4


def test_copies_never_alias_the_kept_cache():
    kept = PrefixCache(10**6, CHUNK)
    a = list(range(1, 10))
    assert kept.store(a, prefilled(a), torch.zeros(5))
    for start in (kept.restore(a), kept.restore(a[:8] + [50])):
        start.cache.layers[0].keys.add_(1000)
    assert held(kept.restore(a).cache) == a


def test_budget_drops_the_least_recently_used_and_refuses_what_cannot_be_kept():
    a, b, c = ([k] * 8 for k in (1, 2, 3))
    kept = PrefixCache(2 * entry_bytes(8), CHUNK)
    assert kept.store(a, prefilled(a), torch.zeros(5)) and kept.store(b, prefilled(b), torch.zeros(5))
    assert kept.restore(a + [0]).tokens == 8  # a is now the most recently used
    assert kept.store(c, prefilled(c), torch.zeros(5))
    assert kept.restore(b + [0]) is None and kept.restore(a + [0]) and kept.restore(c + [0])
    assert kept.nbytes() == 2 * entry_bytes(8)
    assert not kept.store([4] * 30, prefilled([4] * 30), torch.zeros(5))  # over the whole budget
    assert not kept.store([5] * 3, prefilled([5] * 3), torch.zeros(5))  # shorter than a chunk
    # A layer that dropped states (a sliding window cut back) cannot be restored exactly.
    cut_back = prefilled([6] * 8, sliding=True)
    cut_back.layers[0].cumulative_length = 12
    assert not kept.store([6] * 12, cut_back, torch.zeros(5))
    off = PrefixCache(0, CHUNK)
    assert not off.store(a, prefilled(a), torch.zeros(5)) and off.restore(a) is None


class SequenceLike:
    """A cache like llama.cpp's ``SequenceKV``: ``cut`` copies by reference (shared cells)."""

    def __init__(self, ids: list[int]):
        self.ids = list(ids)

    def holds_every_state(self, n: int) -> bool:
        return len(self.ids) == n

    def cut(self, n: int):
        return SequenceLike(self.ids[:n])

    def __deepcopy__(self, memo):
        return self.cut(len(self.ids))

    def nbytes(self) -> int:
        return 10 * len(self.ids)


def test_backend_caches_restore_after_any_token_and_entries_are_capped():
    kept = PrefixCache(10**6, 1, min_tokens=3, max_entries=2)
    shots = [7, 8, 9, 10, 11]
    assert not kept.store([1, 2], SequenceLike([1, 2]), torch.zeros(5))  # shorter than min_tokens
    assert kept.store(shots + [1], SequenceLike(shots + [1]), torch.zeros(5))
    # Another question after the same shots resumes after the last shared token, not at a chunk.
    other = kept.restore(shots + [2, 3])
    assert other.tokens == len(shots) and other.cache.ids == shots and other.logits is None
    assert kept.reused_tokens == len(shots)
    for tail in ([4], [5]):
        assert kept.store(shots + tail, SequenceLike(shots + tail), torch.zeros(5))
    # Beyond max_entries the least recently used entry goes, whatever the byte budget says.
    assert len(kept._entries) == 2 and tuple(shots + [1]) not in kept._entries
