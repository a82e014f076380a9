"""Client cancel and deadline: generation stops within a segment and every session is freed."""

from __future__ import annotations

import asyncio
import time

import grpc

from cluster import gsm8k_prompt
from coolfusion.clients.client import FusionClient, build_request


async def _wait_no_sessions(cluster, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        live = {name: core.info()["live_sessions"] for name, core in cluster.cores.items()}
        if not any(live.values()) or time.monotonic() > deadline:
            return live
        await asyncio.sleep(0.2)


async def test_cancelled_stream_frees_every_session(cluster):
    async with FusionClient(cluster.address) as client:
        call = client.stub.GenerateStream(
            build_request(gsm8k_prompt(2), mode="cool", models=["smollm2", "gemma3"], max_new_tokens=200)
        )
        segments = 0
        async for item in call:
            if item.HasField("segment"):
                segments += 1
                if segments == 2:
                    call.cancel()
                    break
        assert segments == 2
        assert await _wait_no_sessions(cluster) == {"smollm2": 0, "gemma3": 0, "smollm2b": 0}
        # The services keep serving.
        reply = await client.generate("1, 2, 3,", mode="single:gemma3", max_new_tokens=3)
        assert reply.text


async def test_deadline_exceeded_frees_every_session(cluster):
    async with FusionClient(cluster.address, timeout=3.0) as client:
        started = time.monotonic()
        try:
            await client.generate(gsm8k_prompt(4), mode="cool", models=["smollm2", "gemma3"], max_new_tokens=400)
            raise AssertionError("400 fused tokens cannot finish in 3 s here")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 10
    assert await _wait_no_sessions(cluster) == {"smollm2": 0, "gemma3": 0, "smollm2b": 0}
