"""Sampled fused generation through the services (orchestrator, workers, tokenizer service on
loopback, bundled models): the seed reproduces the text, also under concurrency with the
workers' cross-session batching on; temperature 0 is the greedy path; rerank samples each
model's whole answer; bad values are INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import pytest
import pytest_asyncio

from coolfusion.clients.client import FusionClient

PROMPT = "Once upon a time, in a small village,"  # the models hesitate at nearly every word
TOKENS = 12


@pytest_asyncio.fixture(loop_scope="session")
async def client(cluster):
    async with FusionClient(cluster.address) as c:
        yield c


def _models(**options):
    return dict(models=["smollm2", "gemma3"], max_new_tokens=TOKENS, **options)


async def test_same_seed_same_text(client, cluster):
    """Same request, same seed: the same segments, alone (the engine speculates) and as 4
    concurrent clients (no speculation; the workers batch the sessions' steps)."""
    request = _models(temperature=1.0, top_p=0.95, seed=42)
    first = await client.generate(PROMPT, **request)
    assert first.seed == 42 and first.text
    again = await client.generate(PROMPT, **request)
    assert again.text == first.text
    assert [s.model for s in again.segments] == [s.model for s in first.segments]
    before = _batched_steps(cluster)
    replies = await asyncio.gather(*(client.generate(PROMPT, **request) for _ in range(4)))
    assert [r.text for r in replies] == [first.text] * 4
    assert _batched_steps(cluster) > before  # the sessions' steps did share forwards


def _batched_steps(cluster) -> int:
    """Decode steps the workers ran inside a batch of several (as test_worker_core counts them)."""
    return sum(c.batcher.stats.steps - c.batcher.stats.sizes.get(1, 0) for c in cluster.cores.values())


async def test_seeds_differ_and_greedy_stays(client):
    """Two seeds at temperature 1 give two texts; temperature 0 ignores top_p, top_k and seed and
    is the greedy reply; top_k 1 at any temperature draws the argmax, so it is greedy too."""
    a = await client.generate(PROMPT, **_models(temperature=1.0, seed=1))
    b = await client.generate(PROMPT, **_models(temperature=1.0, seed=2))
    assert a.text != b.text
    greedy = await client.generate(PROMPT, **_models())
    assert not greedy.HasField("seed")
    same = await client.generate(PROMPT, **_models(temperature=0.0, top_p=0.5, top_k=3, seed=9))
    assert same.text == greedy.text and not same.HasField("seed")
    top1 = await client.generate(PROMPT, **_models(temperature=1.5, top_k=1, seed=3))
    assert top1.text == greedy.text


async def test_rerank_samples_each_answer(client):
    """Rerank's candidates are each model's own sampled answer: what single:<model> writes with
    the same seed; the winner is the rule's choice among them."""
    sampling = dict(temperature=0.9, seed=7, max_new_tokens=TOKENS)
    reply = await client.generate(PROMPT, mode="rerank", models=["smollm2", "gemma3"], **sampling)
    (segment,) = reply.segments
    answers = {c.model: c.text for c in segment.candidates}
    for name in ("smollm2", "gemma3"):
        single = await client.generate(PROMPT, mode=f"single:{name}", **sampling)
        assert answers[name] == single.text
    assert reply.text == answers[segment.model] and reply.seed == 7
    greedy = await client.generate(PROMPT, mode="rerank", models=["smollm2", "gemma3"], max_new_tokens=TOKENS)
    assert {c.text for c in greedy.segments[0].candidates} != set(answers.values())


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=1.0, top_p=1.5), "top_p"),
        (dict(temperature=1.0, top_k=-2), "top_k"),
    ],
)
async def test_bad_sampling_is_invalid_argument(client, fields, message):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.generate(PROMPT, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details() and "\n" not in info.value.details()


async def test_cli_reports_and_reuses_the_seed(cluster, client):
    """``coolfusion generate --temperature`` without a seed: the server draws one, reported in
    --json; --seed reproduces the text (the client library's too); a bad value is one line on
    stderr, no traceback."""

    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "coolfusion.clients.cli", "generate", PROMPT, "--connect", cluster.address),
            *("--models", "smollm2,gemma3", "--max-new-tokens", str(TOKENS), *args),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        return proc.returncode, out.decode(), err.decode()

    sampled = ("--temperature", "0.8", "--top-p", "0.9", "--top-k", "40")
    code, out, err = await cli(*sampled, "--json")
    assert code == 0, err
    drawn = json.loads(out)
    assert isinstance(drawn["seed"], int) and 0 <= drawn["seed"] < 2**53
    code, out, err = await cli(*sampled, "--seed", str(drawn["seed"]))
    assert code == 0 and out == drawn["text"] and f"seed {drawn['seed']}" in err
    reply = await client.generate(PROMPT, **_models(temperature=0.8, top_p=0.9, top_k=40, seed=drawn["seed"]))
    assert reply.text == drawn["text"]
    code, out, err = await cli("--temperature", "1", "--top-p", "2")
    assert code == 2 and "INVALID_ARGUMENT: top_p must be in [0, 1]" in err and "Traceback" not in err
