"""Chaos beyond one worker, with real processes: a tokenizer service, a SmolLM2
worker (short session TTL, small KV budget) and the orchestrator, each a ``coolfusion`` process.

* the tokenizer service killed mid-stream: UNAVAILABLE naming it; after its restart requests
  succeed again;
* the orchestrator killed under load: its clients get UNAVAILABLE, the worker reaps the orphaned
  sessions by TTL, a restarted orchestrator serves again;
* the worker hung (SIGSTOP): the request ends at its deadline; after SIGCONT its session is freed;
* a burst of long prompts against the KV budget: RESOURCE_EXHAUSTED for the excess, the worker
  stays up, and the admitted ones finish with the text they have alone.

Model time is small: every generation asks for a few tokens, except the streams that are
interrupted after their first segment."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from cluster import HANG_GUARD_S
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coolfusion.clients.client import FusionClient
from coolfusion.clients.launcher import READY_PREFIX
from coolfusion.protos import worker_pb2, worker_pb2_grpc
from coolfusion.services.worker.llamacpp import llamacpp_available

pytestmark = pytest.mark.slow  # processes with the bundled SmolLM2

SESSION_TTL_S = 2.0
# The worker runs the backend ``auto`` picks, as a user's does: llama.cpp where it is built. A KV
# budget for one LONG_PROMPT, not two: SmolLM2-135M holds 45 KiB per token on transformers (float32,
# 66 MiB a prompt), half that in llama.cpp's float16 cells.
KV_BUDGET_MB = 50 if llamacpp_available() else 100
LONG_PROMPT = "The quick brown fox jumps over the lazy dog near the river bank. " * 110  # ~1,500 tokens
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"


class Tree:
    """The three processes; each can be killed and started again on its port."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}

    def start(self, name: str, args: list[str]) -> None:
        port = self.ports.get(name, 0)
        proc = subprocess.Popen(
            [sys.executable, "-m", "coolfusion.clients.cli", *args, "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=open(self.log_dir / f"{name}.log", "a"),
            text=True,
            start_new_session=True,
            env={**{k: v for k, v in os.environ.items() if k != "COOLFUSION_BACKEND"}, "OMP_NUM_THREADS": "1"},
        )
        deadline = time.monotonic() + HANG_GUARD_S
        for line in proc.stdout:
            if line.startswith(READY_PREFIX):
                self.procs[name], self.ports[name] = proc, json.loads(line[len(READY_PREFIX) :])["port"]
                return
            if time.monotonic() > deadline:
                break
        proc.kill()
        raise RuntimeError(f"{name} did not start: {(self.log_dir / f'{name}.log').read_text()[-2000:]}")

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def start_tokenizer(self) -> None:
        self.start("tokenizer", ["tokenizer", "--models", "smollm2"])

    def start_worker(self) -> None:
        self.start(
            "worker",
            [
                "worker",
                "--model",
                "smollm2",
                "--tokenizer-service",
                self.address("tokenizer"),
                "--threads",
                "1",
                "--session-ttl",
                str(SESSION_TTL_S),
                "--kv-budget-mb",
                str(KV_BUDGET_MB),
            ],
        )

    def start_orchestrator(self) -> None:
        self.start(
            "orchestrator",
            [
                "orchestrator",
                "--worker",
                f"smollm2={self.address('worker')}",
                "--tokenizer-service",
                self.address("tokenizer"),
            ],
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        os.killpg(self.procs[name].pid, sig)
        if sig == signal.SIGKILL:
            self.procs[name].wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
async def tree(tmp_path_factory):
    t = Tree(tmp_path_factory.mktemp("chaos"))
    try:
        await asyncio.to_thread(t.start_tokenizer)
        await asyncio.to_thread(t.start_worker)
        await asyncio.to_thread(t.start_orchestrator)
        yield t
    finally:
        t.stop()


async def _worker_sessions(tree) -> int:
    async with grpc.aio.insecure_channel(tree.address("worker")) as channel:
        info = await worker_pb2_grpc.ModelWorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=30)
    return info.live_sessions


async def _until_no_sessions(tree) -> int:
    deadline = time.monotonic() + HANG_GUARD_S
    while (live := await _worker_sessions(tree)) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return live


async def _first_segment_then(stream, action) -> grpc.aio.AioRpcError:
    """Read a stream; after its first segment run ``action``; the stream must then fail."""
    acted = False
    try:
        async for item in stream:
            if item.HasField("segment") and not acted:
                acted = True
                await action()
    except grpc.aio.AioRpcError as exc:
        assert acted, exc
        return exc
    raise AssertionError("the stream finished although the fault came in its middle")


async def _serving(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def _generate_soon(address: str, **request):
    """A request once the channels found the restarted service again (grpc reconnects with a
    backoff of at most 3 s, ``CHANNEL_OPTIONS``): UNAVAILABLE is retried within that bound only."""
    deadline = time.monotonic() + 10.0
    async with FusionClient(address, timeout=HANG_GUARD_S) as client:
        while True:
            try:
                return await client.generate(**request)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)


async def test_tokenizer_service_killed_mid_stream(tree):
    async with FusionClient(tree.address("orchestrator"), timeout=HANG_GUARD_S) as client:
        stream = client.stream_raw(COUNTING, mode="single:smollm2", max_new_tokens=400)
        exc = await _first_segment_then(stream, lambda: asyncio.to_thread(tree.kill, "tokenizer"))
    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
    assert f"tokenizer service at {tree.address('tokenizer')}" in exc.details()
    await asyncio.to_thread(tree.start_tokenizer)
    await _serving(tree.address("tokenizer"))
    reply = await _generate_soon(tree.address("orchestrator"), prompt=COUNTING, mode="single:smollm2", max_new_tokens=4)
    assert reply.text
    assert await _until_no_sessions(tree) == 0


async def test_orchestrator_killed_under_load(tree):
    address = tree.address("orchestrator")
    async with FusionClient(address, timeout=HANG_GUARD_S) as client:
        streams = [client.stream_raw(f"{COUNTING} {i}", mode="single:smollm2", max_new_tokens=400) for i in range(3)]
        started = [asyncio.Event() for _ in streams]
        killed = asyncio.Event()

        async def read(stream, first: asyncio.Event) -> grpc.StatusCode:
            try:
                async for _ in stream:
                    first.set()
                    await killed.wait()
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        readers = [asyncio.create_task(read(s, e)) for s, e in zip(streams, started)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), HANG_GUARD_S)
        assert await _worker_sessions(tree) == 3
        await asyncio.to_thread(tree.kill, "orchestrator")
        killed.set()
        assert await asyncio.gather(*readers) == [grpc.StatusCode.UNAVAILABLE] * 3
    # Nobody closes the sessions now: the worker's TTL reaps them.
    assert await _until_no_sessions(tree) == 0
    await asyncio.to_thread(tree.start_orchestrator)
    reply = await _generate_soon(address, prompt=COUNTING, mode="single:smollm2", max_new_tokens=4)
    assert reply.text


async def test_hung_worker_ends_the_request_at_its_deadline(tree):
    deadline_s = 12.0  # room for the first segment on a loaded machine
    async with FusionClient(tree.address("orchestrator"), timeout=deadline_s) as client:
        t0 = time.monotonic()
        stream = client.stream_raw(COUNTING, mode="single:smollm2", max_new_tokens=400)
        try:
            exc = await _first_segment_then(stream, lambda: asyncio.to_thread(tree.kill, "worker", signal.SIGSTOP))
            elapsed = time.monotonic() - t0
        finally:
            os.killpg(tree.procs["worker"].pid, signal.SIGCONT)
    assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
    assert elapsed < deadline_s + 2.0  # the client's deadline ends it, not the worker
    assert await _until_no_sessions(tree) == 0  # closed by the orchestrator, or reaped by TTL


async def test_burst_of_long_prompts_against_the_kv_budget(tree):
    address = tree.address("orchestrator")
    prompts = [f"{i}. {LONG_PROMPT}" for i in range(4)]

    async def ask(prompt: str):
        async with FusionClient(address, timeout=HANG_GUARD_S) as client:
            try:
                return (await client.generate(prompt, mode="single:smollm2", max_new_tokens=4)).text
            except grpc.aio.AioRpcError as exc:
                return exc

    results = await asyncio.gather(*(ask(p) for p in prompts))
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    codes = [f"{r.code().name}: {r.details()}" for r in refused]
    assert refused and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused), codes
    assert "KV" in refused[0].details() and "budget" in refused[0].details()
    assert tree.procs["worker"].poll() is None  # no out-of-memory kill
    admitted = [(p, r) for p, r in zip(prompts, results) if isinstance(r, str)]
    assert admitted
    for prompt, text in admitted:  # alone, the same text
        async with FusionClient(address, timeout=HANG_GUARD_S) as client:
            alone = await client.generate(prompt, mode="single:smollm2", max_new_tokens=4)
        assert alone.text == text
    assert await _until_no_sessions(tree) == 0
