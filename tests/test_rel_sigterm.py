"""SIGTERM to the orchestrator process while a generation streams (issue 7): the request
completes or ends with a clear status within the grace period, the worker's sessions are freed,
and no process of the tree is left behind."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from coolfusion.clients.launcher import LocalCluster
from coolfusion.protos import fusion_pb2, fusion_pb2_grpc, worker_pb2, worker_pb2_grpc

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


async def test_sigterm_during_a_generation(tmp_path):
    cluster = LocalCluster(["smollm2"], run_dir=str(tmp_path))
    await asyncio.to_thread(cluster.start, 300)
    procs = {s.name: s for s in cluster.processes}
    pids = [s.proc.pid for s in cluster.processes]
    try:
        orchestrator = procs["orchestrator"]
        request = fusion_pb2.GenerateRequest(
            prompt="Question: Count from one to twenty in words.\nAnswer:", mode="single:smollm2", max_new_tokens=48
        )
        outcome, sent_at = None, None
        async with grpc.aio.insecure_channel(cluster.address) as channel:
            stub = fusion_pb2_grpc.FusionStub(channel)
            try:
                async for item in stub.GenerateStream(request, timeout=GRACE + 60):
                    if item.HasField("segment") and sent_at is None:
                        orchestrator.proc.send_signal(signal.SIGTERM)
                        sent_at = time.monotonic()
                    if item.HasField("final"):
                        outcome = "completed"
            except grpc.aio.AioRpcError as exc:
                assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc
                outcome = f"{exc.code().name}: {exc.details()}"
            assert sent_at is not None and outcome is not None
            assert time.monotonic() - sent_at < GRACE + 10, outcome
            # The draining orchestrator takes no new request.
            try:
                await stub.Generate(fusion_pb2.GenerateRequest(prompt="1, 2,", max_new_tokens=2), timeout=10)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), exc
        rc = await asyncio.to_thread(orchestrator.proc.wait, GRACE + 10)
        assert rc == 0, orchestrator.log_tail()
        assert time.monotonic() - sent_at < GRACE + 10

        # The worker holds no session of the drained orchestrator.
        async with grpc.aio.insecure_channel(procs["worker:smollm2"].address) as channel:
            info = await worker_pb2_grpc.ModelWorkerStub(channel).Info(worker_pb2.InfoRequest(), timeout=10)
        assert info.live_sessions == 0
        print(f"\nSIGTERM during a generation: {outcome}")
    finally:
        await asyncio.to_thread(cluster.stop)
    deadline = time.monotonic() + 10
    while not all(_group_gone(p) for p in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert all(_group_gone(p) for p in pids), "orphan processes left"
