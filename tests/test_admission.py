"""Admission checks: a request too large for a model is refused with
INVALID_ARGUMENT naming the model and the numbers before any worker opens a session.

Real services on loopback: the tokenizer service (the bundled tokenizers), the orchestrator, and
worker servers that report a model's facts and count the Opens they get (no model loaded: the
point is that none is asked to work)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from coolfusion.clients.client import FusionClient
from coolfusion.orchestrator.admission import count_request
from coolfusion.orchestrator.engine import FusionEngine
from coolfusion.orchestrator.request import FusionRequest
from coolfusion.orchestrator.server import build_service as build_orchestrator
from coolfusion.orchestrator.wire import Limits
from coolfusion.protos import tokenizer_pb2, tokenizer_pb2_grpc, worker_pb2_grpc
from coolfusion.protos import worker_pb2 as wpb
from coolfusion.services.common.errors import FailedPrecondition
from coolfusion.services.common.server import GrpcService
from coolfusion.services.tokenizer.context import Context, context_ids, count_tokens, render
from coolfusion.services.tokenizer.server import build_service as build_tokenizer_service
from coolfusion.services.worker.results import OpenResult
from coolfusion.services.worker.server import SERVICE_NAME as WORKER_SERVICE

CONTEXT = {"smollm2": 8192, "gemma3": 32768}  # the bundled models' context lengths


class CountingWorker(worker_pb2_grpc.ModelWorkerServicer):
    """Info as a real worker of ``name`` reports it; every Open is counted and refused (a request
    that got this far passed admission)."""

    def __init__(self, name: str, context_length: int):
        self.name, self.context_length, self.opens = name, context_length, 0

    async def Info(self, request, context):
        return wpb.InfoResponse(name=self.name, tokenizer_id=self.name, context_length=self.context_length)

    async def Open(self, request, context):
        self.opens += 1
        raise FailedPrecondition(f"{self.name}: admitted")


@pytest.fixture(scope="module")
async def services(tokenizer_registry):
    started = []
    tokenizer = build_tokenizer_service(tokenizer_registry)
    tok_address = f"127.0.0.1:{await tokenizer.start()}"
    started.append(tokenizer)
    workers, addresses = {}, {}
    for name, length in CONTEXT.items():
        workers[name] = CountingWorker(name, length)
        service = GrpcService(
            lambda server, s=workers[name]: worker_pb2_grpc.add_ModelWorkerServicer_to_server(s, server),
            [WORKER_SERVICE],
        )
        addresses[name] = f"127.0.0.1:{await service.start()}"
        started.append(service)
    orchestrator, _ = build_orchestrator(addresses, tokenizer_address=tok_address)
    address = f"127.0.0.1:{await orchestrator.start()}"
    started.append(orchestrator)
    yield {"address": address, "workers": workers, "tokenizer": tok_address, "addresses": addresses}
    for service in reversed(started):
        await service.stop(0)


def _opens(services) -> int:
    return sum(w.opens for w in services["workers"].values())


async def _refused(services, **request) -> str:
    before = _opens(services)
    async with FusionClient(services["address"]) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.generate(**request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert _opens(services) == before, "a worker was asked to open a session"
    return caught.value.details()


async def test_a_context_too_long_for_one_model_is_refused_before_any_open(services):
    prompt = "one two three four five six seven eight nine ten " * 900  # ~9,000 tokens
    details = await _refused(services, prompt=prompt, max_new_tokens=16)
    assert "model smollm2" in details and "8192" in details and "max_new_tokens is 16" in details
    # Gemma-3 alone has room for it: admitted (the counting worker refuses the Open itself).
    async with FusionClient(services["address"]) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.generate(prompt, mode="single:gemma3", max_new_tokens=16)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "admitted" in caught.value.details()


async def test_max_new_tokens_counts_against_the_context_length(services):
    prompt = "word " * 7000  # fits smollm2's 8192 alone, not with 2,000 more tokens
    details = await _refused(services, prompt=prompt, mode="single:smollm2", max_new_tokens=2000)
    assert "max_new_tokens is 2000" in details and "context length 8192" in details


async def test_too_many_messages_and_too_many_characters(services):
    details = await _refused(services, messages=[{"role": "user", "content": "hi"}] * 5000)
    assert details == "request has 5000 messages; the limit is 1024"
    details = await _refused(services, prompt="x" * 200_001)
    assert "200001 characters" in details
    # At the character limit: the token count refuses it (SmolLM2 and Gemma-3 both too short).
    details = await _refused(services, prompt="The cat sat. " * 15_384 + "x" * 8)
    assert "model smollm2: context has more than" in details and "context length 8192" in details


async def test_rendered_characters_are_limited_after_the_chat_template(services):
    limits = Limits(max_rendered_chars=400)
    orchestrator, _ = build_orchestrator(services["addresses"], tokenizer_address=services["tokenizer"], limits=limits)
    address = f"127.0.0.1:{await orchestrator.start()}"
    try:
        async with FusionClient(address) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.generate(messages=[{"role": "user", "content": "y" * 390}], max_new_tokens=4)
        details = caught.value.details()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "rendered context has" in details and "the limit is 400" in details
    finally:
        await orchestrator.stop(0)


async def test_count_context_is_what_a_worker_prefills(services, tokenizer_registry):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 你好 🦩?"}]
    async with grpc.aio.insecure_channel(services["tokenizer"]) as channel:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        for prompt, msgs in (("Question: 2 + 2 =", None), (None, messages)):
            reply = await stub.CountContext(count_request(["smollm2", "gemma3"], prompt, msgs))
            for count in reply.counts:
                tokenizer = tokenizer_registry.get(count.tokenizer_id)
                context = render(tokenizer, prompt, msgs)
                assert (count.tokens, count.chars) == (len(context_ids(tokenizer, context)), len(context.text))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CountContext(count_request(["nope"], "hi"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CountContext(tokenizer_pb2.CountContextRequest(tokenizer_ids=["gemma3"], prompt=b"\xff"))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in caught.value.details()


@pytest.mark.parametrize("tokenizer_id", ["smollm2", "gemma3"])
def test_a_prefix_count_is_a_lower_bound_of_the_whole(tokenizer_registry, tokenizer_id):
    """Counting stops on a prefix cut where no token can span: its count is at most the whole's."""
    tokenizer = tokenizer_registry.get(tokenizer_id)
    texts = [
        "Héllo wörld, 你好 🦩! " * 3000,
        "def f(x):\n    return x  # comment\n" * 2000,
        "The cat sat on the mat. " * 4000,
    ]
    for text in texts:
        whole = len(context_ids(tokenizer, Context(text, False)))
        tokens, lower_bound = count_tokens(tokenizer, Context(text, False), stop_above=1000)
        assert tokens <= whole and (not lower_bound or tokens > 1000), (tokens, whole)
        assert count_tokens(tokenizer, Context(text, False)) == (whole, False)


async def test_an_unavailable_tokenizer_service_is_named(services):
    orchestrator, _ = build_orchestrator(services["addresses"], tokenizer_address="127.0.0.1:1")
    address = f"127.0.0.1:{await orchestrator.start()}"
    try:
        async with FusionClient(address) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.generate("hello", max_new_tokens=4)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "tokenizer service at 127.0.0.1:1" in caught.value.details()
    finally:
        await orchestrator.stop(0)


class _Handle:
    """An in-process worker handle whose Open fails at once or waits until cancelled."""

    def __init__(self, name: str, fail: bool):
        self.name, self.fail = name, fail
        self.cancelled = asyncio.Event()

    async def open(self, prompt, messages) -> OpenResult:
        if self.fail:
            raise FailedPrecondition(f"{self.name} cannot open")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        raise AssertionError("unreachable")

    async def close(self, session_id: str) -> None:
        return None


async def test_a_failed_open_cancels_the_other_opens():
    slow, failing = _Handle("slow", fail=False), _Handle("failing", fail=True)
    engine = FusionEngine([slow, failing])
    with pytest.raises(FailedPrecondition, match="failing cannot open"):
        async for _ in engine.generate(FusionRequest(prompt="hi", max_new_tokens=2)):
            pass
    assert slow.cancelled.is_set()  # cancelled, not awaited (it would never have returned)


async def test_a_request_id_that_cannot_go_back_as_metadata_is_refused(services):
    """Found by fuzzing: a control character in request_id made the reply's trailing metadata
    invalid (INTERNAL)."""
    details = await _refused(services, prompt="hi", max_new_tokens=2, request_id="a\x1fb")
    assert details.startswith("request_id must be 1-128 printable ASCII characters")
