"""Reliability: worker session TTL/LRU/KV budget, health while loading, degraded
fusion, deadline propagation and a bad-input table at the worker API.

Real gRPC servers on loopback; every wait is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest
import pytest_asyncio
from cluster import HANG_GUARD_S, gate_worker
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_faults import start_worker

from coolfusion.clients.cli import build_parser
from coolfusion.orchestrator.options import FusionOptions
from coolfusion.orchestrator.server import build_service as build_orchestrator
from coolfusion.protos import fusion_pb2, fusion_pb2_grpc, worker_pb2_grpc
from coolfusion.protos import worker_pb2 as wpb
from coolfusion.services.common.metrics import KV_BYTES, LIVE_SESSIONS
from coolfusion.services.common.server import GrpcService
from coolfusion.services.worker.model import WorkerCore
from coolfusion.services.worker.server import SERVICE_NAME as WORKER_SERVICE
from coolfusion.services.worker.server import WorkerServicer


def _gauge(gauge, name: str) -> float:
    return gauge.labels(name)._value.get()


async def _serve_core(core: WorkerCore | None, name: str = "", serving: bool = True, **kw):
    servicer = WorkerServicer(core, name=name, **kw)
    service = GrpcService(
        lambda server: worker_pb2_grpc.add_ModelWorkerServicer_to_server(servicer, server), [WORKER_SERVICE]
    )
    service.on_stop.append(servicer.stop_reaper)
    port = await service.start(serving=serving)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return service, servicer, channel, worker_pb2_grpc.ModelWorkerStub(channel)


def _copy_core(cluster, name: str, **limits) -> WorkerCore:
    """A separate worker core over the cluster's loaded SmolLM2 (its own sessions and limits)."""
    shared = cluster.cores["smollm2"]
    return WorkerCore(name, shared.spec, device="cpu", model=shared.model, hf_tokenizer=shared.tokenizer.hf, **limits)


TTL = 3600.0  # a session TTL no test waits for


async def _until(condition, timeout: float = HANG_GUARD_S) -> bool:
    """Wait for a state (polled); the timeout is only a guard against a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def _expect(code, fragment, coro):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    assert info.value.code() == code, info.value
    assert fragment in info.value.details(), info.value.details()
    assert "Traceback" not in info.value.details()
    return info.value.details()


# ---- 1. sessions: LRU cap, KV budget, idle TTL, idempotent Close, gauges ----------------------
async def test_session_lru_cap_kv_budget_and_idle_ttl(cluster):
    name = "smollm2-limits"
    core = _copy_core(cluster, name, max_sessions=2)  # the TTL is set for its own phase below
    service, _servicer, channel, stub = await _serve_core(core, reap_interval=0.2)
    try:

        async def open_():
            return (await stub.Open(wpb.OpenRequest(prompt=b"1, 2, 3,"))).session_id

        # LRU cap: the third session evicts the least recently used idle one.
        a = await open_()
        b = await open_()
        await stub.NextText(wpb.NextTextRequest(session_id=a, max_tokens=2))  # a is now more recent than b
        c = await open_()
        assert sorted(core._sessions) == sorted([a, c])
        await _expect(
            grpc.StatusCode.NOT_FOUND,
            "evicted (least recently used; max 2 sessions)",
            stub.NextText(wpb.NextTextRequest(session_id=b, max_tokens=2)),
        )
        assert _gauge(LIVE_SESSIONS, name) == 2
        assert _gauge(KV_BYTES, name) == core.stats()[1] > 0

        # Close is idempotent (and an evicted session closes as "did not exist").
        assert (await stub.Close(wpb.CloseRequest(session_id=c))).existed
        assert not (await stub.Close(wpb.CloseRequest(session_id=c))).existed
        assert not (await stub.Close(wpb.CloseRequest(session_id=b))).existed

        # KV budget: a second session over the budget evicts the older idle one.
        one = core.session_bytes(a)["kv_bytes"]
        core.kv_budget_bytes = int(one * 1.5)
        d = await open_()
        assert list(core._sessions) == [d]
        details = await _expect(
            grpc.StatusCode.NOT_FOUND,
            "KV budget",
            stub.UpdateState(wpb.UpdateStateRequest(session_id=a, state_id="0.0")),
        )
        assert a in details
        core.kv_budget_bytes = 0

        # Idle TTL: the server's reaper frees a session idle for longer than the TTL, and only that
        # one. The TTL is long; a session is made idle by moving its last use back (no sleeps).
        e = await open_()
        core.session_ttl = TTL
        await stub.NextToken(wpb.NextTokenRequest(session_id=e))  # e is in use
        core._sessions[d].last_used -= 2 * TTL  # d has been idle for two TTLs
        assert await _until(lambda: d not in core._sessions)
        assert list(core._sessions) == [e]
        await _expect(grpc.StatusCode.NOT_FOUND, "expired after", stub.NextToken(wpb.NextTokenRequest(session_id=d)))
        core._sessions[e].last_used -= 2 * TTL
        assert await _until(lambda: list(core._sessions) == [])
        # A reaper pass after the last eviction sets the gauges.
        assert await _until(lambda: _gauge(LIVE_SESSIONS, name) == 0 and _gauge(KV_BYTES, name) == 0)
        # The worker keeps serving.
        assert (await stub.Info(wpb.InfoRequest())).name == name
        await stub.Close(wpb.CloseRequest(session_id=await open_()))
    finally:
        await channel.close()
        await service.stop(0)


def test_worker_session_flags_and_env(monkeypatch):
    args = build_parser().parse_args(
        [
            "worker",
            "--model",
            "smollm2",
            "--tokenizer-service",
            "x:1",
            "--session-ttl",
            "5",
            "--max-sessions",
            "3",
            "--kv-budget-mb",
            "64",
        ]
    )
    assert (args.session_ttl, args.max_sessions, args.kv_budget_mb) == (5.0, 3, 64.0)
    monkeypatch.setenv("COOLFUSION_SESSION_TTL", "7")
    monkeypatch.setenv("COOLFUSION_MAX_SESSIONS", "9")
    monkeypatch.setenv("COOLFUSION_KV_BUDGET_MB", "128")
    args = build_parser().parse_args(["worker", "--model", "smollm2", "--tokenizer-service", "x:1"])
    assert (args.session_ttl, args.max_sessions, args.kv_budget_mb) == (7.0, 9, 128.0)


# ---- 2. health NOT_SERVING while the model loads ----------------------------------------------
async def test_health_not_serving_while_loading(cluster):
    service, servicer, channel, stub = await _serve_core(None, name="smollm2-loading", serving=False)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        for svc in ("", WORKER_SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=svc))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await _expect(grpc.StatusCode.UNAVAILABLE, "loading", stub.Info(wpb.InfoRequest()))
        await _expect(grpc.StatusCode.UNAVAILABLE, "loading", stub.Open(wpb.OpenRequest(prompt=b"Hi")))

        servicer.set_core(_copy_core(cluster, "smollm2-loading"))  # the model is loaded
        await service.set_serving()
        reply = await health.Check(health_pb2.HealthCheckRequest(service=WORKER_SERVICE))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert (await stub.Info(wpb.InfoRequest())).name == "smollm2-loading"
    finally:
        await channel.close()
        await service.stop(0)


# ---- 3. degraded fusion: a worker process dies mid-stream ------------------------------------
@pytest_asyncio.fixture(loop_scope="session")
async def fusion_with_a_worker_process(cluster):
    """Orchestrator over gemma3 (in-process) and smollm2 (a worker process we may kill)."""
    proc, port = await asyncio.to_thread(start_worker, cluster.tokenizer_address)
    service, engine = build_orchestrator({"smollm2": f"127.0.0.1:{port}", "gemma3": cluster.worker_addresses["gemma3"]})
    orch_port = await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{orch_port}")
    yield fusion_pb2_grpc.FusionStub(channel), proc, engine
    await channel.close()
    await service.stop(0)
    for worker in engine.workers.values():
        await worker.aclose()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def test_degraded_fusion_survives_a_killed_worker(cluster, fusion_with_a_worker_process):
    """SmolLM2's worker dies after the first segment, before the second round (held until then):
    fusion goes on with Gemma-3 alone, on a machine of any speed."""
    stub, proc, engine = fusion_with_a_worker_process
    gated = gate_worker(engine, "smollm2", at=2)
    request = fusion_pb2.GenerateRequest(
        prompt="Question: What is 12 plus 30?\nAnswer:",
        mode="cool",
        max_new_tokens=24,
        max_segment_tokens=4,
        allow_degraded=True,
    )
    segments, final = [], None
    async for item in stub.GenerateStream(request, timeout=HANG_GUARD_S):
        if item.HasField("segment"):
            segments.append(item.segment)
            if len(segments) == 1:
                os.killpg(proc.pid, signal.SIGKILL)  # the smollm2 worker dies mid-generation
                proc.wait()
                gated.gate.set()
        else:
            final = item.final
    assert final is not None
    assert list(final.degraded_models) == ["smollm2"]
    # Segments of the first round were fused by both; every one after it by Gemma-3 alone.
    both = [s for s in segments if [c.model for c in s.candidates] == ["smollm2", "gemma3"]]
    alone = [s for s in segments if [c.model for c in s.candidates] == ["gemma3"]]
    assert segments == both + alone and both and alone, [[c.model for c in s.candidates] for s in segments]
    assert all(s.model == "gemma3" for s in alone)
    assert final.text == "".join(s.text for s in segments)

    # The worker is down: without allow_degraded the request fails naming it; with it, gemma3 answers.
    request.prompt, request.max_new_tokens = "1, 2, 3,", 4
    request.allow_degraded = False
    await _expect(grpc.StatusCode.UNAVAILABLE, "worker smollm2", stub.Generate(request, timeout=60))
    request.allow_degraded = True
    reply = await stub.Generate(request, timeout=60)
    assert reply.text and list(reply.degraded_models) == ["smollm2"]
    assert all(s.model == "gemma3" for s in reply.segments)
    live = {n: c.info()["live_sessions"] for n, c in cluster.cores.items()}
    assert live["gemma3"] == 0, live


# ---- 4. deadline propagation -----------------------------------------------------------------
async def test_worker_calls_get_the_callers_remaining_time(cluster):
    service, engine = build_orchestrator({n: cluster.worker_addresses[n] for n in ("smollm2", "gemma3")})
    port = await service.start()
    seen: list[tuple[str, float | None]] = []
    deadlines: list[float] = []  # when each call's timeout runs out, on this process's clock
    for worker in engine.workers.values():
        for method in ("Open", "NextText", "ScoreCandidates", "UpdateState"):
            inner = getattr(worker.stub, method)

            def record(request, timeout=None, _inner=inner, _m=method, **kw):
                seen.append((_m, timeout))
                if timeout is not None:
                    deadlines.append(time.monotonic() + timeout)
                return _inner(request, timeout=timeout, **kw)

            setattr(worker.stub, method, record)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = fusion_pb2_grpc.FusionStub(channel)
    try:
        request = fusion_pb2.GenerateRequest(prompt="1, 2, 3,", mode="cool", max_new_tokens=4)
        await stub.Generate(request, timeout=20)
        # Commits ride on NextText by default; with fold_commits off they are UpdateState calls.
        assert {m for m, _ in seen} >= {"Open", "NextText"} and "UpdateState" not in {m for m, _ in seen}
        timeouts = [t for _, t in seen]
        # grpc sends the deadline as a timeout rounded up (here to 100 ms units), so the server may
        # see slightly more than the caller's 20 s — never the 600 s default.
        assert all(t is not None and 0 < t <= 20.2 for t in timeouts), seen
        # Every call's timeout is the time left to one deadline, the caller's (so it shrinks from
        # call to call); half a second covers a thread switch between computing and recording it.
        assert max(deadlines) - min(deadlines) < 0.5, deadlines
        seen.clear()
        deadlines.clear()
        engine.options = FusionOptions.without("fold_commits")  # and follow_segments, which needs it
        try:
            await stub.Generate(request, timeout=20)
        finally:
            engine.options = FusionOptions()
        assert "UpdateState" in {m for m, _ in seen}
        assert all(t is not None and 0 < t <= 20.2 for _, t in seen), seen
        seen.clear()
        await stub.Generate(request)  # no caller deadline: the worker call default
        assert seen and all(t == 600.0 for _, t in seen), seen
    finally:
        await channel.close()
        await service.stop(0)
        for worker in engine.workers.values():
            await worker.aclose()


# ---- 7. bad input at the worker API -----------------------------------------------------------
async def test_worker_bad_input_table(cluster):
    core = cluster.cores["smollm2"]
    channel = grpc.aio.insecure_channel(cluster.worker_addresses["smollm2"])
    stub = worker_pb2_grpc.ModelWorkerStub(channel)
    try:
        sid = (await stub.Open(wpb.OpenRequest(prompt=b"1, 2, 3,"))).session_id
        first = await stub.NextText(wpb.NextTextRequest(session_id=sid, max_tokens=2))
        await stub.UpdateState(wpb.UpdateStateRequest(session_id=sid, state_id=first.state_id))
        I, N, F = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION
        table = [
            (
                "token id too large",
                I,
                "out of range",
                stub.FeedTokens(wpb.FeedTokensRequest(session_id=sid, token_ids=[core.vocab_size + 5])),
            ),
            (
                "negative token id",
                I,
                "out of range",
                stub.FeedTokens(wpb.FeedTokensRequest(session_id=sid, token_ids=[-1])),
            ),
            ("unknown session", N, "no session", stub.NextText(wpb.NextTextRequest(session_id="nope", max_tokens=2))),
            (
                "stale state id",
                F,
                "stale",
                stub.UpdateState(wpb.UpdateStateRequest(session_id=sid, state_id=first.state_id)),
            ),
            (
                "unknown state id",
                F,
                "unknown state",
                stub.UpdateState(wpb.UpdateStateRequest(session_id=sid, state_id="x")),
            ),
            (
                "negative max_tokens",
                I,
                "max_tokens must be >= 0",
                stub.NextText(wpb.NextTextRequest(session_id=sid, max_tokens=-3)),
            ),
            ("invalid UTF-8 prompt", I, "not valid UTF-8", stub.Open(wpb.OpenRequest(prompt=b"ok \xff\xfe"))),
            ("empty prompt", I, "prompt is empty", stub.Open(wpb.OpenRequest(prompt=b""))),
            ("empty messages", I, "messages is empty", stub.Open(wpb.OpenRequest(messages=wpb.ChatMessages()))),
            (
                "message without role",
                I,
                "non-empty string 'role'",
                stub.Open(
                    wpb.OpenRequest(messages=wpb.ChatMessages(messages=[wpb.ChatMessage(role="", content="hi")]))
                ),
            ),
            (
                "no candidates",
                I,
                "candidates is empty",
                stub.ScoreCandidates(wpb.ScoreCandidatesRequest(session_id=sid)),
            ),
        ]
        for label, code, fragment, call in table:
            try:
                await _expect(code, fragment, call)
            except AssertionError as exc:
                raise AssertionError(f"{label}: {exc}") from None
        # The session and the worker keep serving.
        again = await stub.NextText(wpb.NextTextRequest(session_id=sid, max_tokens=2))
        assert again.token_ids
        assert (await stub.Close(wpb.CloseRequest(session_id=sid))).existed
        assert (await stub.Info(wpb.InfoRequest())).name == "smollm2"
    finally:
        await channel.close()
