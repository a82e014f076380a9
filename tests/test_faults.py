"""A worker process killed mid-generation: UNAVAILABLE naming it, then recovery when it returns."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest_asyncio
from cluster import HANG_GUARD_S, gate_worker, gsm8k_prompt

from coolfusion.clients.client import FusionClient
from coolfusion.clients.launcher import READY_PREFIX
from coolfusion.orchestrator.server import build_service as build_orchestrator


def start_worker(tokenizer_address: str, port: int = 0) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coolfusion.clients.cli",
            "worker",
            "--model",
            "smollm2",
            "--tokenizer-service",
            tokenizer_address,
            "--port",
            str(port),
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if line.startswith(READY_PREFIX):
            return proc, json.loads(line[len(READY_PREFIX) :])["port"]
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("worker did not start")


@pytest_asyncio.fixture(loop_scope="session")
async def orchestrator_over_a_worker_process(cluster):
    proc, port = await asyncio.to_thread(start_worker, cluster.tokenizer_address)
    service, engine = build_orchestrator({"smollm2": f"127.0.0.1:{port}"})
    orch_port = await service.start()
    state = {"proc": proc, "port": port, "tokenizer": cluster.tokenizer_address, "engine": engine}
    yield f"127.0.0.1:{orch_port}", state
    await service.stop(0)
    for worker in engine.workers.values():
        await worker.aclose()
    for p in {proc, state["proc"]}:
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


async def test_killed_worker_gives_unavailable_then_recovers(orchestrator_over_a_worker_process):
    """The worker dies after the first segment and before the second round, which is held until
    then: the generation cannot have finished first, on a machine of any speed."""
    address, state = orchestrator_over_a_worker_process
    engine = state["engine"]
    gated = gate_worker(engine, "smollm2", at=2)
    async with FusionClient(address, timeout=HANG_GUARD_S) as client:
        try:
            async for item in client.stream_raw(gsm8k_prompt(1), mode="single:smollm2", max_new_tokens=200):
                if item.HasField("segment") and not gated.gate.is_set():
                    os.killpg(state["proc"].pid, signal.SIGKILL)  # dies in the middle of the generation
                    state["proc"].wait()
                    gated.gate.set()
            raise AssertionError("the generation finished although its worker was killed")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            assert "worker smollm2" in exc.details()

        # The worker comes back on the same port; the orchestrator's channel reconnects by itself.
        state["proc"], _ = await asyncio.to_thread(start_worker, state["tokenizer"], state["port"])
        await asyncio.wait_for(gated.inner.channel.channel_ready(), HANG_GUARD_S)
        reply = await client.generate("1, 2, 3,", mode="single:smollm2", max_new_tokens=4)
        assert reply.text
