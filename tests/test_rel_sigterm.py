"""SIGTERM to the orchestrator process while a generation streams: new requests are
refused at once, the request in flight completes within the grace period (draining, not dropping
it), the worker's sessions are freed, and no process of the tree is left behind. The worker runs
the backend ``auto`` picks for the bundled GGUF on a CPU (llama.cpp where it is built), as a
user's does."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import grpc
import pytest

from coolfusion.clients.launcher import LocalCluster
from coolfusion.protos import fusion_pb2, fusion_pb2_grpc, worker_pb2, worker_pb2_grpc
from coolfusion.services.common.security import token_metadata
from coolfusion.services.worker.llamacpp import llamacpp_available

GRACE = 30.0  # the orchestrator's default --grace

pytestmark = pytest.mark.slow  # a process tree with the bundled SmolLM2


def _group_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _logged_request_ids(path) -> set[str]:
    """Request ids the orchestrator logged (JSON lines; grpc's own lines are not JSON)."""
    ids = set()
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            ids.add(json.loads(line).get("request_id", ""))
    return ids


async def test_sigterm_during_a_generation(tmp_path, monkeypatch):
    monkeypatch.setenv("COOLFUSION_LOG_FORMAT", "json")  # the processes' logs carry request ids
    monkeypatch.delenv("COOLFUSION_BACKEND", raising=False)  # the worker's own default: auto
    cluster = LocalCluster(["smollm2"], run_dir=str(tmp_path))
    await asyncio.to_thread(cluster.start, 300)
    procs = {s.name: s for s in cluster.processes}
    pids = [s.proc.pid for s in cluster.processes]
    try:
        orchestrator = procs["orchestrator"]
        # Long enough that it is still streaming when the probe below is refused (that takes
        # milliseconds after the signal; this generation takes seconds on any machine).
        request = fusion_pb2.GenerateRequest(
            prompt="Question: Count from one to one hundred in words.\nAnswer:",
            mode="single:smollm2",
            max_new_tokens=256,
            request_id="long-one",
        )
        async with (
            grpc.aio.insecure_channel(cluster.address) as channel,
            grpc.aio.insecure_channel(cluster.address) as other,
        ):
            stub, probe_stub = fusion_pb2_grpc.FusionStub(channel), fusion_pb2_grpc.FusionStub(other)
            listed = await stub.ListModels(fusion_pb2.ListModelsRequest(), timeout=30)
            assert [m.backend for m in listed.models] == ["llamacpp" if llamacpp_available() else "transformers"]
            first_segment = asyncio.Event()
            ended: list[str] = []  # how the first request ended, once it did

            async def read() -> str:
                try:
                    async for item in stub.GenerateStream(request, timeout=GRACE + 60):
                        first_segment.set()
                        if item.HasField("final"):
                            ended.append("completed")
                except grpc.aio.AioRpcError as exc:
                    ended.append(f"{exc.code().name}: {exc.details()}")
                finally:
                    first_segment.set()
                return ended[-1] if ended else "no final message"

            reader = asyncio.create_task(read())
            await asyncio.wait_for(first_segment.wait(), 300)
            orchestrator.proc.send_signal(signal.SIGTERM)
            sent_at = time.monotonic()
            # The draining orchestrator takes no new request. A probe that arrives before the signal
            # is handled is served (it is short); the next ones must be refused.
            refused = None
            for n in range(200):
                probe = fusion_pb2.GenerateRequest(
                    prompt="1, 2,", mode="single:smollm2", max_new_tokens=2, request_id=f"probe-{n}"
                )
                try:
                    await probe_stub.Generate(probe, timeout=GRACE)
                except grpc.aio.AioRpcError as exc:
                    refused = (probe.request_id, exc)
                    break
                await asyncio.sleep(0.05)
            assert refused is not None, "the orchestrator kept taking requests after SIGTERM"
            # Refused at once: UNAVAILABLE once the client has the server's GOAWAY, a reset stream
            # (CANCELLED) when the request went out before it.
            assert refused[1].code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), refused
            # ... while the first request was still in flight: the refusal came from the draining
            # server, not from a process that was already gone.
            assert not ended, ended
            outcome = await reader
            assert outcome == "completed", outcome  # drained: the request in flight was not dropped
            assert time.monotonic() - sent_at < GRACE + 10, outcome
        rc = await asyncio.to_thread(orchestrator.proc.wait, GRACE + 10)
        assert rc == 0, orchestrator.log_tail()
        # The refused probe never started in the orchestrator (no request taken, then dropped).
        logged = _logged_request_ids(orchestrator.log_path)
        assert "long-one" in logged, orchestrator.log_tail()
        assert refused[0] not in logged, orchestrator.log_tail()

        # The worker holds no session of the drained orchestrator; it answers only with the internal
        # token the launcher gave the services (the inside is closed by default).
        async with grpc.aio.insecure_channel(procs["worker:smollm2"].address) as channel:
            stub = worker_pb2_grpc.ModelWorkerStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as anonymous:
                await stub.Info(worker_pb2.InfoRequest(), timeout=10)
            info = await stub.Info(
                worker_pb2.InfoRequest(), timeout=10, metadata=token_metadata(cluster.internal_token)
            )
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert info.live_sessions == 0
        print(f"\nSIGTERM during a generation: {outcome}")
    finally:
        await asyncio.to_thread(cluster.stop)
    deadline = time.monotonic() + 10
    while not all(_group_gone(p) for p in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert all(_group_gone(p) for p in pids), "orphan processes left"
