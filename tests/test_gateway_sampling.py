"""Sampling through the OpenAI-compatible gateway: the same
seed gives the same text, choice i of a seeded request samples with seed + i, and different seeds
at temperature 1 give different texts on a prompt where the models are uncertain."""

from __future__ import annotations

import openai
import pytest
from cluster import HANG_GUARD_S

from coolfusion.services.gateway.serve import GatewayThread

PAIR = ["smollm2", "gemma3"]
EXT = {"coolfusion": {"models": PAIR}}
UNCERTAIN = "Once upon a time, in a small village, there lived a"  # many plausible continuations
TOKENS = 12


@pytest.fixture(scope="module")
def gateway(cluster):
    with GatewayThread(cluster.address) as gw:
        yield gw


async def _texts(gw: GatewayThread, seed: int, n: int = 1) -> list[str]:
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="none", max_retries=0, timeout=HANG_GUARD_S)
    reply = await client.completions.create(
        model="cool", prompt=UNCERTAIN, max_tokens=TOKENS, temperature=1.0, seed=seed, n=n, extra_body=EXT
    )
    return [c.text for c in sorted(reply.choices, key=lambda c: c.index)]


async def test_same_seed_same_text_different_seeds_differ_and_choices_use_seed_plus_index(gateway):
    first = await _texts(gateway, 7)
    assert await _texts(gateway, 7) == first
    second = await _texts(gateway, 8)
    assert second != first  # temperature 1 on an uncertain prompt: the seed matters
    # Two choices generated concurrently (batched on the workers) are the seed-7 and seed-8 texts.
    assert await _texts(gateway, 7, n=2) == [first[0], second[0]]
