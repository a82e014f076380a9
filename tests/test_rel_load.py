"""Load (issue 7): 200 fused requests from 16 concurrent clients, 20 % cancelled at random points;
every request ends (OK or CANCELLED), every worker is back to 0 live sessions and 0 KV bytes,
and the process RSS is back within noise.

``COOLFUSION_LOAD_REQUESTS`` overrides the count (default 200).
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import grpc

from coolfusion.protos import fusion_pb2, fusion_pb2_grpc

REQUESTS = int(os.environ.get("COOLFUSION_LOAD_REQUESTS", 200))
CLIENTS = 16
CANCEL_SHARE = 0.2
PROMPTS = ["1, 2, 3,", "The capital of France is", "Q: 2 + 2 =", "Once upon a time", "a b c d", "Hello, my name is"]


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _wait_idle(cluster, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = {n: core.stats() for n, core in cluster.cores.items()}  # (live sessions, KV bytes)
        if not any(live or kv for live, kv in state.values()) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.2)


async def test_load_with_random_cancels(cluster):
    rng = random.Random(7)
    cancel_at = {i: rng.uniform(0.0, 1.5) for i in rng.sample(range(REQUESTS), int(REQUESTS * CANCEL_SHARE))}
    jobs = asyncio.Queue()
    for i in range(REQUESTS):
        jobs.put_nowait(i)
    outcome: dict[int, str] = {}

    async with grpc.aio.insecure_channel(cluster.address) as channel:
        stub = fusion_pb2_grpc.FusionStub(channel)

        async def one(i: int) -> str:
            request = fusion_pb2.GenerateRequest(
                prompt=PROMPTS[i % len(PROMPTS)], mode="cool", models=["smollm2", "gemma3"], max_new_tokens=3
            )
            call = stub.GenerateStream(request, timeout=300)
            timer = None
            if i in cancel_at:
                timer = asyncio.get_running_loop().call_later(cancel_at[i], call.cancel)
            final = None
            try:
                async for item in call:
                    if item.HasField("final"):
                        final = item.final
            except asyncio.CancelledError:
                return "cancelled"
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED and i in cancel_at:
                    return "cancelled"
                return f"error {exc.code().name}: {exc.details()}"
            finally:
                if timer is not None:
                    timer.cancel()
            if call.cancelled() and final is None:
                return "cancelled"
            return "ok" if final is not None and final.text is not None else "no final"

        async def client() -> None:
            while not jobs.empty():
                i = jobs.get_nowait()
                outcome[i] = await one(i)

        # Warm up (first forwards allocate), then take the memory baseline.
        for _ in range(2):
            await stub.Generate(fusion_pb2.GenerateRequest(prompt="1, 2,", models=["smollm2", "gemma3"], max_new_tokens=3))
        assert await _wait_idle(cluster) == {n: (0, 0) for n in cluster.cores}
        rss_before = _rss_mib()

        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(CLIENTS))), timeout=900)
        elapsed = time.monotonic() - started

    assert len(outcome) == REQUESTS
    bad = {i: o for i, o in outcome.items() if o not in ("ok", "cancelled") or (o == "cancelled" and i not in cancel_at)}
    assert not bad, bad
    assert all(outcome[i] == "ok" for i in range(REQUESTS) if i not in cancel_at)
    assert await _wait_idle(cluster) == {n: (0, 0) for n in cluster.cores}
    rss_after = _rss_mib()
    cancelled = sum(o == "cancelled" for o in outcome.values())
    print(
        f"\nload: {REQUESTS} requests, {CLIENTS} clients, {cancelled} cancelled, {elapsed:.1f} s; "
        f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB"
    )
    assert rss_after - rss_before < 300, (rss_before, rss_after)
