"""Load: fused requests (60 by default) from 16 concurrent clients, 20 % cancelled at random points;
every request ends as planned (OK, or CANCELLED when it was cancelled), the orchestrator saw each
cancellation that came in the middle of a generation, every answer under load is the answer the
same request gets alone, every worker is back to 0 live sessions and 0 KV bytes, and the process
RSS is back within noise.

``COOLFUSION_LOAD_REQUESTS`` overrides the count (default 60; the count CI can afford).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time

import grpc
from cluster import HANG_GUARD_S

from coolfusion.protos import fusion_pb2, fusion_pb2_grpc

REQUESTS = int(os.environ.get("COOLFUSION_LOAD_REQUESTS", 60))
CLIENTS = 16
CANCEL_SHARE = 0.2
PROMPTS = ["1, 2, 3,", "The capital of France is", "Q: 2 + 2 =", "Once upon a time", "a b c d", "Hello, my name is"]
TOKENS = 3
# A request to cancel is longer, so that after its first or second segment it is still being
# generated (the orchestrator then sees the cancellation mid-generation).
CANCELLED_TOKENS = 64


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _heap_at_rest(cluster) -> float:
    """The process RSS once every idle worker's reaper has trimmed the heap its sessions freed
    (``services/worker/memory.py``): waited for, not called, so the reaper is what is tested."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not all(core.heap_trimmed() for core in cluster.cores.values()):
        assert time.monotonic() < deadline, "no reaper pass trimmed the heap"
        await asyncio.sleep(0.2)
    return _rss_mib()


def _leak_mib(cluster, requests: int) -> float:
    """What the KV caches of ``requests`` sessions pairs hold, at the fewest tokens any of them has
    (its prompt's and TOKENS new ones): a run that leaked them would grow RSS by at least this."""
    total = 0
    for name in ("smollm2", "gemma3"):
        core = cluster.cores[name]
        per_prompt = []
        for prompt in PROMPTS:
            sid, n_context, _ = core.open(prompt)
            try:
                per_token = core.stats()[1] / n_context
            finally:
                core.close(sid)
            per_prompt.append(per_token * (n_context + TOKENS))
        total += min(per_prompt) * requests
    return total / 2**20


async def _wait_idle(cluster, timeout: float = HANG_GUARD_S) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = {n: core.stats() for n, core in cluster.cores.items()}  # (live sessions, KV bytes)
        if not any(live or kv for live, kv in state.values()) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.2)


def _request(i: int, tokens: int, label: str = "load") -> fusion_pb2.GenerateRequest:
    return fusion_pb2.GenerateRequest(
        prompt=PROMPTS[i % len(PROMPTS)],
        mode="cool",
        models=["smollm2", "gemma3"],
        max_new_tokens=tokens,
        request_id=f"{label}-{i}",
    )


async def test_load_with_random_cancels(cluster, caplog):
    caplog.set_level(logging.INFO, logger="coolfusion.orchestrator.server")
    test_started = time.monotonic()
    rng = random.Random(7)
    # Cancel points: 0 = as soon as the call is made (it may not have reached the orchestrator),
    # 1 or 2 = right after that many segments arrived.
    cancel_after = {i: rng.choice((0, 1, 2)) for i in rng.sample(range(REQUESTS), int(REQUESTS * CANCEL_SHARE))}
    jobs = asyncio.Queue()
    for i in range(REQUESTS):
        jobs.put_nowait(i)
    outcome: dict[int, str] = {}

    async with grpc.aio.insecure_channel(cluster.address) as channel:
        stub = fusion_pb2_grpc.FusionStub(channel)

        # Each prompt alone: the answer every uncancelled request must get under load too.
        alone = {}
        for k, prompt in enumerate(PROMPTS):
            reply = await stub.Generate(_request(k, TOKENS, "alone"))
            alone[prompt] = (reply.text, reply.finish_reason)
        assert all(text for text, _ in alone.values()), alone

        async def one(i: int) -> str:
            cancel = cancel_after.get(i)
            call = stub.GenerateStream(
                _request(i, TOKENS if cancel is None else CANCELLED_TOKENS), timeout=HANG_GUARD_S
            )
            if cancel == 0:
                call.cancel()
            segments, final = [], None
            try:
                async for item in call:
                    if item.HasField("segment"):
                        segments.append(item.segment)
                        if len(segments) == cancel:
                            call.cancel()
                    else:
                        final = item.final
            except asyncio.CancelledError:  # reading a call this client cancelled
                return "cancelled" if call.cancelled() else "interrupted"
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED and cancel is not None:
                    return "cancelled"
                return f"error {exc.code().name}: {exc.details()}"
            if final is None:
                return "no final message"
            if final.text != "".join(s.text for s in segments):
                return "final text is not its segments"
            got = (final.text, final.finish_reason)
            want = alone[PROMPTS[i % len(PROMPTS)]]
            return "ok" if got == want else f"differs from alone: {got} != {want}"

        async def client() -> None:
            while not jobs.empty():
                i = jobs.get_nowait()
                outcome[i] = await one(i)

        # Warm up (first forwards allocate), then take the memory baseline.
        for _ in range(2):
            await stub.Generate(
                fusion_pb2.GenerateRequest(prompt="1, 2,", models=["smollm2", "gemma3"], max_new_tokens=3)
            )
        assert await _wait_idle(cluster) == {n: (0, 0) for n in cluster.cores}
        leak_mib = await asyncio.to_thread(_leak_mib, cluster, REQUESTS)
        rss_before = await _heap_at_rest(cluster)

        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(CLIENTS))), timeout=HANG_GUARD_S * 3)
        elapsed = time.monotonic() - started

    assert len(outcome) == REQUESTS
    planned = {i: "cancelled" if i in cancel_after else "ok" for i in range(REQUESTS)}
    wrong = {i: o for i, o in outcome.items() if o != planned[i]}
    assert not wrong, wrong
    assert await _wait_idle(cluster) == {n: (0, 0) for n in cluster.cores}
    # Each request cancelled after a segment was cancelled in the orchestrator, mid-generation.
    ends = {}
    for record in caplog.records:
        rid = getattr(record, "request_id", "")
        if rid.startswith("load-") and record.getMessage() != "generation started":
            ends[int(rid[5:])] = record.getMessage()
    midway = [i for i, k in cancel_after.items() if k > 0]
    assert midway and {i: ends.get(i) for i in midway} == {i: "generation cancelled" for i in midway}
    assert all(ends.get(i) == "generation finished" for i in range(REQUESTS) if i not in cancel_after)
    rss_after = await _heap_at_rest(cluster)
    print(
        f"\nload: {REQUESTS} requests, {CLIENTS} clients, {len(cancel_after)} cancelled ({len(midway)} mid-generation), "
        f"{elapsed:.1f} s (before it {started - test_started:.1f} s, after it {time.monotonic() - started - elapsed:.1f} s); "
        f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB (leaking the sessions would add {leak_mib:.0f} MiB)"
    )
    assert rss_after - rss_before < leak_mib, (rss_before, rss_after, leak_mib)
