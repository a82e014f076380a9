"""Client cancel and deadline: the generation stops, the orchestrator sees the cancellation, and
every session is freed.

The generation is held at a known point (a worker's NextText waits for a gate that opens only after
the client gave up), so the request is provably still running when it is cancelled or its deadline
passes, on a machine of any speed."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from cluster import HANG_GUARD_S, gate_worker, gsm8k_prompt

from coolfusion.clients.client import FusionClient, build_request
from coolfusion.orchestrator.server import build_service as build_orchestrator


async def _wait_no_sessions(cluster, timeout: float = HANG_GUARD_S) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        live = {name: core.info()["live_sessions"] for name, core in cluster.cores.items()}
        if not any(live.values()) or time.monotonic() > deadline:
            return live
        await asyncio.sleep(0.2)


async def _gated_orchestrator(cluster):
    service, engine = build_orchestrator({n: cluster.worker_addresses[n] for n in ("smollm2", "gemma3")})
    gated = gate_worker(engine, "gemma3", at=2)  # the second round waits for the gate
    port = await service.start()
    return service, engine, gated, f"127.0.0.1:{port}"


async def _stop(service, engine, gated) -> None:
    gated.gate.set()
    await service.stop(0)
    for worker in engine.workers.values():
        await worker.aclose()


async def _log_lines(caplog, request_id: str, count: int = 2) -> list[str]:
    """The orchestrator's log lines of a request, once it wrote ``count`` (its start and end)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        lines = [r.getMessage() for r in caplog.records if getattr(r, "request_id", None) == request_id]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        await asyncio.sleep(0.1)


async def test_cancelled_stream_frees_every_session(cluster, caplog):
    caplog.set_level(logging.INFO, logger="coolfusion.orchestrator.server")
    service, engine, gated, address = await _gated_orchestrator(cluster)
    try:
        async with FusionClient(address) as client:
            call = client.stub.GenerateStream(
                build_request(
                    gsm8k_prompt(2),
                    mode="cool",
                    models=["smollm2", "gemma3"],
                    max_new_tokens=200,
                    request_id="cancel-me",
                )
            )
            first = await asyncio.wait_for(call.read(), HANG_GUARD_S)
            assert first.HasField("segment")
            await asyncio.wait_for(gated.reached.wait(), HANG_GUARD_S)  # the generation is in its second round
            call.cancel()
            assert await _wait_no_sessions(cluster) == {"smollm2": 0, "gemma3": 0, "smollm2b": 0}
            # The orchestrator saw the cancellation in the middle of the generation.
            assert await _log_lines(caplog, "cancel-me") == ["generation started", "generation cancelled"]
    finally:
        await _stop(service, engine, gated)
    # The services keep serving.
    async with FusionClient(cluster.address) as client:
        reply = await client.generate("1, 2, 3,", mode="single:gemma3", max_new_tokens=3)
    assert reply.text


async def test_deadline_exceeded_frees_every_session(cluster, caplog):
    caplog.set_level(logging.INFO, logger="coolfusion.orchestrator.server")
    service, engine, gated, address = await _gated_orchestrator(cluster)
    try:
        async with FusionClient(address, timeout=2.0) as client:
            try:
                await client.generate(
                    "1, 2, 3,", mode="cool", models=["smollm2", "gemma3"], max_new_tokens=64, request_id="too-slow"
                )
                raise AssertionError("the generation finished although its second round was held past the deadline")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await _wait_no_sessions(cluster) == {"smollm2": 0, "gemma3": 0, "smollm2b": 0}
        # The orchestrator ended the request at the deadline: cancelled while held (or failed, when a
        # worker call of the first round reached the same deadline first on a slow machine).
        lines = await _log_lines(caplog, "too-slow")
        assert lines[0] == "generation started" and len(lines) == 2, lines
        assert (
            lines[1] == "generation cancelled" or "DEADLINE_EXCEEDED" in lines[1] or "deadline" in lines[1].lower()
        ), lines
    finally:
        await _stop(service, engine, gated)
