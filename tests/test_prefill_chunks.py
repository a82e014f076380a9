"""Chunked prefill on a tiny random Gemma-3 whose sliding window (8) is crossed
by the chunks: the logits are bitwise those of ``generate(prefill_chunk_size=...)`` (the worker's
oracle) and equal to one unchunked prefill up to float noise; a cancellation asked between chunks
stops the prefill. No bundled model: a fast test."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from coolfusion.services.worker.forward import PrefillCancelled
from coolfusion.services.worker.prefix_cache import PrefixCache
from coolfusion.services.worker.transformers_backend import TransformersForwards

WINDOW = 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=WINDOW,
        max_position_embeddings=256,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    )
    return Gemma3ForCausalLM(config).eval()


def _generate_logits(model, ids: list[int], chunk: int | None) -> torch.Tensor:
    out = model.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
        do_sample=False,
        max_new_tokens=1,
        return_dict_in_generate=True,
        output_logits=True,
        prefill_chunk_size=chunk,
    )
    return out.logits[0][0].float()


@pytest.mark.parametrize("chunk", [3, WINDOW, 20])
def test_chunks_are_generates_chunked_prefill(model, chunk):
    ids = torch.randint(3, 128, (50,), generator=torch.Generator().manual_seed(chunk)).tolist()
    _, logits = TransformersForwards(model, torch.device("cpu"), 1, prefill_chunk=chunk).prefill(ids)
    assert torch.equal(logits, _generate_logits(model, ids, chunk))
    _, whole = TransformersForwards(model, torch.device("cpu"), 1, prefill_chunk=len(ids)).prefill(ids)
    assert torch.equal(whole, _generate_logits(model, ids, None))
    assert torch.allclose(logits, whole, atol=1e-5)


def test_a_cancellation_stops_between_chunks(model):
    forwards = TransformersForwards(model, torch.device("cpu"), 1, prefill_chunk=6)
    asked = []

    def cancelled() -> bool:
        asked.append(True)
        return len(asked) == 3

    with pytest.raises(PrefillCancelled, match="after 18 of 50 tokens"):
        forwards.prefill(list(range(3, 53)), cancelled=cancelled)


@pytest.mark.parametrize("chunk", [3, WINDOW, 20])
def test_prefills_from_the_prefix_cache_are_whole_prefills(model, chunk):
    """Contexts restored from the prefix cache at a chunk boundary (past the sliding window) and
    prefilled on give the logits of a whole chunked prefill, bitwise; so does the same context."""
    forwards = TransformersForwards(model, torch.device("cpu"), 1, prefill_chunk=chunk)
    kept = PrefixCache(2**30, chunk)
    rng = torch.Generator().manual_seed(100 + chunk)
    first = torch.randint(3, 128, (50,), generator=rng).tolist()
    cache, logits = forwards.prefill(first, forwards.new_cache())
    assert kept.store(first, cache, logits)
    for ids in (first[:41] + torch.randint(3, 128, (9,), generator=rng).tolist(), first[:30], first):
        start = kept.restore(ids)
        assert start.tokens == (len(ids) if ids == first else min(41, len(ids) - 1) // chunk * chunk) > WINDOW
        if start.logits is None:
            _, start_logits = forwards.prefill(ids, start.cache, done=start.tokens)
        else:
            start_logits = start.logits
        assert torch.equal(start_logits, _generate_logits(model, ids, chunk)), len(ids)
