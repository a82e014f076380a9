"""Client cancel and deadline: the generation stops, the orchestrator sees the cancellation, and
every session is freed.

The generation is held at a known point (a worker's NextText waits for a gate that opens only after
the client gave up), so the request is provably still running when it is cancelled or its deadline
passes, on a machine of any speed."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import grpc
from cluster import HANG_GUARD_S, gate_worker, gsm8k_prompt, wait_no_sessions

from coolfusion.clients.client import FusionClient, build_request
from coolfusion.orchestrator.server import build_service as build_orchestrator
from coolfusion.protos import worker_pb2, worker_pb2_grpc


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
            assert await wait_no_sessions(cluster) == {"smollm2": 0, "gemma3": 0, "smollm2b": 0}
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
        assert await wait_no_sessions(cluster) == {"smollm2": 0, "gemma3": 0, "smollm2b": 0}
        # The orchestrator ended the request at the deadline: cancelled while held (or failed, when a
        # worker call of the first round reached the same deadline first on a slow machine).
        lines = await _log_lines(caplog, "too-slow")
        assert lines[0] == "generation started" and len(lines) == 2, lines
        assert (
            lines[1] == "generation cancelled" or "DEADLINE_EXCEEDED" in lines[1] or "deadline" in lines[1].lower()
        ), lines
    finally:
        await _stop(service, engine, gated)


async def test_cancel_mid_prefill_stops_within_a_chunk_and_frees_the_session(cluster, caplog, monkeypatch):
    """An Open of an ~8,000-token prompt, cancelled while its second prefill chunk runs: the
    prefill stops after that chunk (not 60 chunks later) and the session is freed."""
    caplog.set_level(logging.INFO, logger="coolfusion.services.worker.server")
    core = cluster.cores["smollm2"]
    forwards, inner = core._forwards, core._forwards.forward
    calls, reached, gate = [], threading.Event(), threading.Event()

    def gated(rows, cache, keep_last):
        calls.append(len(rows[0]))
        if len(calls) == 2:  # the second chunk waits until the Open was cancelled
            reached.set()
            gate.wait(HANG_GUARD_S)
        return inner(rows, cache, keep_last)

    monkeypatch.setattr(forwards, "forward", gated)
    prompt = "The quick brown fox jumps over the lazy dog near the river bank. " * 570
    tokens = len(core.tokenizer.hf(prompt)["input_ids"])
    assert 7500 < tokens < core.max_positions
    try:
        async with grpc.aio.insecure_channel(cluster.worker_addresses["smollm2"]) as channel:
            call = worker_pb2_grpc.ModelWorkerStub(channel).Open(worker_pb2.OpenRequest(prompt=prompt.encode()))
            assert await asyncio.to_thread(reached.wait, HANG_GUARD_S)
            assert core.info()["live_sessions"] == 1  # live (and counted) while it prefills
            call.cancel()
            assert await _until(lambda: any("Open was cancelled" in r.getMessage() for r in caplog.records))
            gate.set()
            assert await wait_no_sessions(cluster) == {"smollm2": 0, "gemma3": 0, "smollm2b": 0}
        assert calls == [core.prefill_chunk, core.prefill_chunk]  # of ceil(tokens / chunk) chunks
    finally:
        gate.set()


async def _until(condition, timeout: float = HANG_GUARD_S) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True
