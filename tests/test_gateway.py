"""The OpenAI-compatible gateway over the real service tree (bundled models): the official
``openai`` client gets what the gRPC client gets (text, usage, provenance), every error status
comes from the real orchestrator, and a client that goes away mid-stream frees every session.

The gateway runs in a thread with its own loop (as in its own process); the services run in the
test's loop, so the tests await the client (``AsyncOpenAI``) and never block that loop."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

import httpx2
import openai
import pytest
from cluster import HANG_GUARD_S, gate_worker, wait_no_sessions

from coolfusion.clients.client import FusionClient
from coolfusion.orchestrator.server import build_service as build_orchestrator
from coolfusion.services.gateway.serve import GatewayThread

PAIR = ["smollm2", "gemma3"]
EXT = {"coolfusion": {"models": PAIR}}
QUESTION = "Question: A baker makes 12 rolls per tray and bakes 3 trays. How many rolls?\nAnswer:"


@pytest.fixture(scope="module")
def gateway(cluster):
    with GatewayThread(cluster.address) as gw:
        yield gw


def _client(gw: GatewayThread, key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=HANG_GUARD_S)


def _usage(reply) -> tuple[int, int]:
    """The gateway's definition: the first model's prompt tokens and fused-output tokens."""
    first = reply.usage[0]
    return first.prompt_tokens, first.output_tokens


class PairOrchestrator:
    """An orchestrator of its own over the cluster's smollm2 and gemma3 workers, optionally with
    a gated gemma3 (``gate_at``), auth tokens or a tight admission limit."""

    def __init__(self, cluster, gate_at: int = 0, **options):
        self.service, self.engine = build_orchestrator({n: cluster.worker_addresses[n] for n in PAIR}, **options)
        self.gated = gate_worker(self.engine, "gemma3", at=gate_at) if gate_at else None
        self.address = ""

    async def __aenter__(self) -> PairOrchestrator:
        self.address = f"127.0.0.1:{await self.service.start()}"
        return self

    async def __aexit__(self, *exc) -> None:
        if self.gated:
            self.gated.gate.set()
        await self.service.stop(0)
        for worker in self.engine.workers.values():
            await worker.aclose()


# ---- answers equal the gRPC service's ----------------------------------------------------------
async def test_completion_streamed_and_not_equals_grpc(cluster, gateway):
    async with FusionClient(cluster.address) as grpc_client:
        oracle = await grpc_client.generate(QUESTION, models=PAIR, max_new_tokens=16)
    client = _client(gateway)
    reply = await client.completions.create(model="cool", prompt=QUESTION, max_tokens=16, temperature=0, extra_body=EXT)
    assert reply.choices[0].text == oracle.text
    assert reply.choices[0].finish_reason == {"eos": "stop", "stop": "stop", "length": "length"}[oracle.finish_reason]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == _usage(oracle)
    assert reply.usage.total_tokens == sum(_usage(oracle))
    (provenance,) = reply.model_extra["coolfusion"]["choices"]
    assert [(s["model"], s["text"]) for s in provenance["segments"]] == [(s.model, s.text) for s in oracle.segments]
    assert provenance["usage"]["gemma3"]["output_tokens"] == next(
        u.output_tokens for u in oracle.usage if u.model == "gemma3"
    )

    stream = await client.completions.create(
        model="cool",
        prompt=QUESTION,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=EXT,
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == oracle.text
    segments = [
        c.model_extra["coolfusion"]["segment"] for c in chunks if c.choices and c.choices[0].finish_reason is None
    ]
    assert [s["model"] for s in segments] == [s.model for s in oracle.segments]
    assert all(len(s["candidates"]) == 2 for s in segments)  # both models' candidates and their PPLs
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == _usage(oracle)


async def test_chat_streamed_and_not_equals_grpc(cluster, gateway):
    messages = [{"role": "user", "content": "What is 7 times 6? Answer with the number."}]
    async with FusionClient(cluster.address) as grpc_client:
        oracle = await grpc_client.generate(None, messages, models=PAIR, max_new_tokens=12)
    client = _client(gateway)
    reply = await client.chat.completions.create(
        model="cool", messages=messages, max_completion_tokens=12, temperature=0, extra_body=EXT
    )
    assert reply.choices[0].message.content == oracle.text
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == _usage(oracle)
    stream = await client.chat.completions.create(
        model="cool", messages=messages, max_tokens=12, stream=True, extra_body=EXT
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == oracle.text


async def test_stop_and_n_choices(cluster, gateway):
    prompt = "Q: What is 1+1?\nA: 2\nQ: What is 2+2?\nA:"
    async with FusionClient(cluster.address) as grpc_client:
        oracle = await grpc_client.generate(prompt, mode="single:gemma3", max_new_tokens=12, stop=["\n"])
    assert oracle.finish_reason == "stop"  # the oracle itself stops at the newline
    reply = await _client(gateway).completions.create(
        model="single:gemma3", prompt=prompt, max_tokens=12, stop="\n", n=2, temperature=0
    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.text for c in reply.choices] == [oracle.text, oracle.text]  # greedy: both choices equal
    assert {c.finish_reason for c in reply.choices} == {"stop"} and "\n" not in oracle.text
    prompt_tokens, completion_tokens = _usage(oracle)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, 2 * completion_tokens)


async def test_temperature_zero_equals_generate_json(cluster, gateway):
    prompt = "The capital of France is"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "coolfusion.clients.cli",
        "generate",
        prompt,
        "--json",
        "--connect",
        cluster.address,
        "--models",
        ",".join(PAIR),
        "--max-new-tokens",
        "8",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), HANG_GUARD_S)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    cli = json.loads(stdout)
    reply = await _client(gateway).completions.create(
        model="cool", prompt=prompt, max_tokens=8, temperature=0, extra_body=EXT
    )
    assert reply.choices[0].text == cli["text"]
    first = cli["usage"][PAIR[0]]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        first["prompt_tokens"],
        first["output_tokens"],
    )


async def test_models_and_health(gateway):
    page = await _client(gateway).models.list()
    assert [m.id for m in page.data] == [
        "cool",
        "cool-noalign",
        "rerank",
        "cool-rerank",
        "single:smollm2",
        "single:gemma3",
        "single:smollm2b",
    ]
    async with httpx2.AsyncClient(timeout=HANG_GUARD_S) as http:
        health = await http.get(f"{gateway.url}/health")
    assert (health.status_code, health.json()) == (200, {"status": "SERVING"})


# ---- errors from the real orchestrator ---------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, status",
    [
        (dict(model="single:llama", prompt="x"), 404),
        (dict(model="cool", prompt="   "), 400),  # the orchestrator: prompt is empty
        (dict(model="cool", prompt="x", max_tokens=100_000), 400),  # beyond the orchestrator's limit
        (dict(model="cool", prompt="x", extra_body={"coolfusion": {"models": ["llama"]}}), 400),
        (dict(model="cool", prompt="x", extra_body={"coolfusion": {"score_rule": "nope"}}), 400),
    ],
)
async def test_bad_requests(gateway, kwargs, status):
    with pytest.raises(openai.APIStatusError) as caught:
        await _client(gateway).completions.create(**kwargs)
    assert caught.value.status_code == status and caught.value.body["message"]


async def test_bearer_tokens_are_the_orchestrator_s(cluster):
    async with PairOrchestrator(cluster, auth_tokens=["s3cret"]) as orch, GatewayThread(orch.address) as gw:
        for key in ("wrong", "s3cretX"):
            with pytest.raises(openai.AuthenticationError):
                await _client(gw, key).completions.create(model="single:smollm2", prompt="1, 2, 3,", max_tokens=2)
        reply = await _client(gw, "s3cret").completions.create(model="single:smollm2", prompt="1, 2, 3,", max_tokens=2)
        assert reply.choices[0].text


async def test_overload_is_429_with_retry_after(cluster):
    async with (
        PairOrchestrator(cluster, gate_at=1, max_concurrent=1, max_queue=0) as orch,
        GatewayThread(orch.address) as gw,
    ):
        client = _client(gw)
        held = asyncio.create_task(
            client.completions.create(model="cool", prompt=QUESTION, max_tokens=4, extra_body=EXT)
        )
        await asyncio.wait_for(orch.gated.reached.wait(), HANG_GUARD_S)  # the one slot is taken
        with pytest.raises(openai.RateLimitError) as caught:
            await client.completions.create(model="cool", prompt=QUESTION, max_tokens=4, stream=True, extra_body=EXT)
        assert caught.value.status_code == 429 and caught.value.response.headers["retry-after"] == "1"
        orch.gated.gate.set()
        assert (await asyncio.wait_for(held, HANG_GUARD_S)).choices[0].text


async def test_deadline_is_504_and_frees_sessions(cluster):
    async with PairOrchestrator(cluster, gate_at=1) as orch, GatewayThread(orch.address, request_timeout=2.0) as gw:
        with pytest.raises(openai.APIStatusError) as caught:
            await _client(gw).completions.create(model="cool", prompt=QUESTION, max_tokens=8, extra_body=EXT)
        assert caught.value.status_code == 504
        assert await wait_no_sessions(cluster) == {"smollm2": 0, "gemma3": 0, "smollm2b": 0}


async def test_unavailable_worker_is_503(cluster):
    service, engine = build_orchestrator({"smollm2": cluster.worker_addresses["smollm2"], "gemma3": "127.0.0.1:1"})
    address = f"127.0.0.1:{await service.start()}"
    try:
        async with GatewayThread(address) as gw:
            for model in ("cool", "single:gemma3"):
                with pytest.raises(openai.APIStatusError) as caught:
                    await _client(gw).completions.create(model=model, prompt="1, 2, 3,", max_tokens=2)
                assert caught.value.status_code == 503, caught.value.body
    finally:
        await service.stop(0)
        for worker in engine.workers.values():
            await worker.aclose()
    assert await wait_no_sessions(cluster) == {"smollm2": 0, "gemma3": 0, "smollm2b": 0}


async def test_disconnect_mid_stream_frees_every_session(cluster, caplog):
    caplog.set_level(logging.INFO, logger="coolfusion.orchestrator.server")
    async with PairOrchestrator(cluster, gate_at=2) as orch, GatewayThread(orch.address) as gw:
        stream = await _client(gw).completions.create(
            model="cool",
            prompt=QUESTION,
            max_tokens=200,
            stream=True,
            extra_body=EXT,
            extra_headers={"x-request-id": "gone"},
        )
        first = await stream.__anext__()
        assert first.choices[0].text
        await asyncio.wait_for(orch.gated.reached.wait(), HANG_GUARD_S)  # the generation is in its second round
        await stream.close()  # the client goes away; the gate stays shut
        assert await wait_no_sessions(cluster) == {"smollm2": 0, "gemma3": 0, "smollm2b": 0}
        deadline = time.monotonic() + HANG_GUARD_S
        while time.monotonic() < deadline:
            lines = [r.getMessage() for r in caplog.records if getattr(r, "request_id", None) == "gone"]
            if len(lines) >= 2:
                break
            await asyncio.sleep(0.1)
        assert lines == ["generation started", "generation cancelled"]


# ---- lm-evaluation-harness's local-completions model ------------------------------------------
LM_EVAL_DATA = Path(__file__).parent / "data" / "lm_eval" / "gsm8k"
LM_EVAL_ITEMS = 2
LM_EVAL_TOKENS = 16


async def test_lm_eval_local_completions_equals_coolfusion_eval(cluster, tmp_path):
    from coolfusion.clients.cli import main
    from coolfusion.clients.lm_eval_model import TASKS_DIR

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    own = {
        "include": str(TASKS_DIR / "coolfusion_gsm8k.yaml"),
        "dataset_kwargs": {
            "data_files": {"train": str(LM_EVAL_DATA / "train.jsonl"), "test": str(LM_EVAL_DATA / "test.jsonl")},
            "cache_dir": str(tmp_path / "hf-datasets"),
        },
    }
    (tasks / "coolfusion_gsm8k.yaml").write_text(json.dumps(own), encoding="utf-8")  # JSON is YAML
    async with PairOrchestrator(cluster) as orch, GatewayThread(orch.address) as gw:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,  # this environment's lm-eval (a copied venv's script may name another python)
            "-m",
            "lm_eval",
            "--model",
            "local-completions",
            "--model_args",
            f"base_url={gw.url}/v1/completions,tokenizer_backend=None,model=cool",
            "--tasks",
            "coolfusion_gsm8k",
            "--include_path",
            str(tasks),
            "--limit",
            str(LM_EVAL_ITEMS),
            "--gen_kwargs",
            f"max_gen_toks={LM_EVAL_TOKENS}",
            "--output_path",
            str(tmp_path / "lm-eval"),
            "--log_samples",
            cwd=tmp_path,
            env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},  # nothing looks at the Hub
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 1200)
        assert proc.returncode == 0, stderr.decode()[-3000:]
        argv = ["eval", "gsm8k", "--connect", orch.address, "--data", str(LM_EVAL_DATA / "test.jsonl")]
        argv += ["--limit", str(LM_EVAL_ITEMS), "--modes", "cool", "--max-new-tokens", str(LM_EVAL_TOKENS)]
        argv += ["--models", ",".join(PAIR), "--out", str(tmp_path / "eval")]
        assert await asyncio.to_thread(main, argv) == 0
    (samples_file,) = (tmp_path / "lm-eval").rglob("samples_coolfusion_gsm8k_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    by_doc = {s["doc_id"]: s["resps"][0][0] for s in samples if s["filter"] == "strict-match"}
    rows = [json.loads(line) for line in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    assert len(by_doc) == len(rows) == LM_EVAL_ITEMS
    assert {r["index"]: r["output"] for r in rows} == by_doc
