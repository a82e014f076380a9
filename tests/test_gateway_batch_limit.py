"""A batch larger than the orchestrator can ever hold (running + queued) is refused by the gateway
at once with 400 ``too_many_choices``, before any generation starts; a batch that fits goes
through. The orchestrator states its capacity in ListModels; the upstream here is a scripted
Fusion service (no model)."""

from __future__ import annotations

import asyncio
import time
import types

import httpx2
import openai
import pytest
import pytest_asyncio

from coolfusion.orchestrator.server import FusionServicer
from coolfusion.protos import fusion_pb2 as pb
from coolfusion.protos import fusion_pb2_grpc as pb_grpc
from coolfusion.services.common.server import GrpcService
from coolfusion.services.gateway.serve import GatewayThread

CAPACITY = 5  # the scripted orchestrator's max_concurrent + max_queue


class CountingFusion(pb_grpc.FusionServicer):
    """Answers every Generate with "ok" and counts the calls."""

    def __init__(self):
        self.calls = 0

    async def Generate(self, request, context):
        self.calls += 1
        return pb.GenerateResponse(text="ok", finish_reason="length", mode=request.mode)

    async def GenerateStream(self, request, context):
        self.calls += 1
        yield pb.GenerateStreamResponse(final=pb.FinalInfo(text="ok", finish_reason="length", mode=request.mode))

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[pb.ModelInfo(name="a")], modes=["cool", "single:a"], max_requests=CAPACITY)


@pytest_asyncio.fixture(loop_scope="session")
async def counting():
    servicer = CountingFusion()
    service = GrpcService(
        lambda server: pb_grpc.add_FusionServicer_to_server(servicer, server),
        [pb.DESCRIPTOR.services_by_name["Fusion"].full_name],
    )
    port = await service.start()
    gateway = GatewayThread(f"127.0.0.1:{port}").start()
    yield servicer, gateway
    gateway.stop()
    await service.stop(0)


def _client(gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="none", max_retries=0)


@pytest.mark.parametrize("prompts,n,stream", [(CAPACITY + 1, 1, False), (10_000, 1, False), (3, 2, True)])
async def test_a_batch_that_never_fits_is_400_at_once(counting, prompts, n, stream):
    servicer, gateway = counting
    before = servicer.calls
    started = time.perf_counter()
    with pytest.raises(openai.BadRequestError) as caught:
        await _client(gateway).completions.create(
            model="cool", prompt=[f"p{i}" for i in range(prompts)], n=n, max_tokens=2, stream=stream
        )
    elapsed = time.perf_counter() - started
    error = caught.value.body
    assert caught.value.status_code == 400 and error["code"] == "too_many_choices"
    assert f"{prompts * n} choices" in error["message"] and f"the {CAPACITY} generations" in error["message"]
    assert servicer.calls == before, "no generation starts for a batch that cannot fit"
    assert elapsed < 5.0


async def test_a_batch_that_fits_goes_through(counting):
    servicer, gateway = counting
    before = servicer.calls
    reply = await _client(gateway).completions.create(model="cool", prompt=["a", "b", "c", "d", "e"], max_tokens=2)
    assert [c.text for c in reply.choices] == ["ok"] * CAPACITY and servicer.calls == before + CAPACITY


async def test_chat_n_beyond_capacity_is_400(counting):
    _, gateway = counting
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=30) as http:
        body = {"model": "cool", "messages": [{"role": "user", "content": "hi"}], "n": CAPACITY + 1, "max_tokens": 2}
        reply = await http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "n"


async def test_orchestrator_states_running_plus_queued():
    servicer = FusionServicer(types.SimpleNamespace(workers={}), max_concurrent=3, max_queue=4)
    reply = await asyncio.wait_for(servicer.ListModels(pb.ListModelsRequest(), None), 10)
    assert reply.max_requests == 7 == servicer.admission.capacity
