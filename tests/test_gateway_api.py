"""The OpenAI-compatible gateway against a scripted Fusion service (no model): request mapping,
response and chunk formats, every error status, client disconnects. The gateway runs in its own
thread and loop (as in its own process); the scripted gRPC service runs in the test's loop, and the
official ``openai`` client (or plain httpx for raw SSE) calls the gateway."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import grpc
import httpx2
import openai
import pytest
import pytest_asyncio

from coolfusion.protos import fusion_pb2 as pb
from coolfusion.protos import fusion_pb2_grpc as pb_grpc
from coolfusion.services.common.errors import InvalidArgument, ResourceExhausted, Unavailable
from coolfusion.services.common.server import GrpcService
from coolfusion.services.gateway.serve import GatewayThread

HANG_GUARD_S = 60.0
SEGMENTS = ["Hello", ",", " world"]
USAGE = [
    pb.ModelUsage(model="alpha", prompt_tokens=7, output_tokens=3, generated_tokens=9, scored_tokens=6),
    pb.ModelUsage(model="beta", prompt_tokens=9, output_tokens=4, generated_tokens=11, scored_tokens=5),
]


def _segment(i: int, text: str) -> pb.Segment:
    return pb.Segment(
        index=i,
        text=text,
        model="alpha" if i % 2 == 0 else "beta",
        candidates=[
            pb.Candidate(model="alpha", text=text, mean_ppl=1.5, ppl=[pb.ScorerPpl(scorer="alpha", ppl=1.25)]),
            pb.Candidate(model="beta", text=text + "?", mean_ppl=float("inf")),
        ],
    )


class ScriptedFusion(pb_grpc.FusionServicer):
    """Answers by prompt: ``busy``/``bad``/``down`` fail up front, ``fail-late`` after a segment,
    ``hold`` sends a segment and waits until cancelled; anything else streams SEGMENTS."""

    def __init__(self):
        self.requests: list[pb.GenerateRequest] = []
        self.metadata: list[dict] = []
        self.held = asyncio.Event()
        self.cancelled = asyncio.Event()

    def _check(self, request, context):
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata() or ()))
        failures = {
            "busy": ResourceExhausted("server busy"),
            "bad": InvalidArgument("prompt is bad"),
            "down": Unavailable("worker gone"),
        }
        if request.prompt in failures:
            raise failures[request.prompt]

    def _final(self, request) -> pb.FinalInfo:
        text = "".join(SEGMENTS)
        return pb.FinalInfo(text=text, finish_reason="length", usage=USAGE, mode=request.mode, score_rule="product")

    async def _hold(self) -> None:
        self.held.set()
        try:
            await asyncio.sleep(HANG_GUARD_S)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def GenerateStream(self, request, context):
        self._check(request, context)
        if request.prompt == "slow":
            await asyncio.sleep(HANG_GUARD_S)
        if request.prompt == "hold-first":
            await self._hold()
        for i, text in enumerate(SEGMENTS):
            yield pb.GenerateStreamResponse(segment=_segment(i, text))
            if request.prompt == "fail-late":
                raise Unavailable("worker gone mid-stream")
            if request.prompt == "hold":
                self.held.set()
                try:
                    await asyncio.sleep(HANG_GUARD_S)
                except asyncio.CancelledError:
                    self.cancelled.set()
                    raise
        yield pb.GenerateStreamResponse(final=self._final(request))

    async def Generate(self, request, context):
        self._check(request, context)
        if request.prompt == "slow":
            await asyncio.sleep(HANG_GUARD_S)
        if request.prompt == "hold":
            await self._hold()
        final = self._final(request)
        return pb.GenerateResponse(
            text=final.text,
            finish_reason=final.finish_reason,
            segments=[_segment(i, t) for i, t in enumerate(SEGMENTS)],
            usage=USAGE,
            mode=request.mode,
            score_rule="product",
        )

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(
            models=[pb.ModelInfo(name="alpha"), pb.ModelInfo(name="beta")],
            modes=["cool", "cool-noalign", "rerank", "cool-rerank", "single:alpha", "single:beta"],
        )


@pytest_asyncio.fixture(loop_scope="session")
async def scripted():
    servicer = ScriptedFusion()
    service = GrpcService(
        lambda server: pb_grpc.add_FusionServicer_to_server(servicer, server),
        [pb.DESCRIPTOR.services_by_name["Fusion"].full_name],
        auth_tokens=["s3cret"],
    )
    port = await service.start()
    gateway = GatewayThread(f"127.0.0.1:{port}").start()
    yield servicer, gateway
    gateway.stop()
    await service.stop(0)


def _client(gateway, key: str = "s3cret") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)


def test_gateway_imports_no_torch():
    code = "import sys, coolfusion.services.gateway.serve, coolfusion.clients.commands.gateway; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


async def test_models_lists_every_configuration(scripted):
    _, gateway = scripted
    page = await _client(gateway).models.list()
    assert [m.id for m in page.data] == ["cool", "cool-noalign", "rerank", "cool-rerank", "single:alpha", "single:beta"]
    assert {m.owned_by for m in page.data} == {"coolfusion"}


async def test_completion_maps_request_and_response(scripted):
    servicer, gateway = scripted
    reply = await _client(gateway).completions.create(
        model="cool",
        prompt=["one", "two"],
        n=2,
        seed=40,
        temperature=0.7,
        top_p=0.9,
        stop="\n\n",
        max_tokens=12,
        user="ada",
        extra_body={
            "coolfusion": {"models": ["alpha", "beta"], "score_rule": "product", "max_segment_tokens": 5, "top_k": 3}
        },
        extra_headers={"x-request-id": "req-1"},
    )
    sent = servicer.requests[-4:]
    assert [r.prompt for r in sent] == ["one", "one", "two", "two"]
    assert [r.seed for r in sent] == [40, 41, 42, 43]  # choice i samples with seed + i
    assert [r.request_id for r in sent] == ["ada:req-1", "ada:req-1-1", "ada:req-1-2", "ada:req-1-3"]
    first = sent[0]
    assert (first.mode, list(first.models), first.max_new_tokens, list(first.stop)) == (
        "cool",
        ["alpha", "beta"],
        12,
        ["\n\n"],
    )
    assert (first.temperature, first.top_p, first.top_k, first.max_segment_tokens) == (
        pytest.approx(0.7),
        pytest.approx(0.9),
        3,
        5,
    )
    assert first.score_rule.name == "product"
    assert servicer.metadata[-1]["authorization"] == "Bearer s3cret"  # the caller's token, forwarded
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert {c.text for c in reply.choices} == {"Hello, world"} and {c.finish_reason for c in reply.choices} == {
        "length"
    }
    # Prompts count once (2 x 7), completions per choice (4 x 3), in the first model's tokenizer.
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (14, 12, 26)
    provenance = reply.model_extra["coolfusion"]["choices"][0]
    assert [s["model"] for s in provenance["segments"]] == ["alpha", "beta", "alpha"]
    assert provenance["segments"][0]["candidates"][1]["mean_ppl"] is None  # infinity has no JSON
    assert provenance["usage"]["beta"] == {
        "prompt_tokens": 9,
        "output_tokens": 4,
        "generated_tokens": 11,
        "scored_tokens": 5,
    }
    assert provenance["score_rule"] == "product"


async def test_chat_without_seed_or_temperature_is_greedy(scripted):
    servicer, gateway = scripted
    reply = await _client(gateway).chat.completions.create(
        model="single:beta",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
        max_completion_tokens=9,
    )
    sent = servicer.requests[-1]
    assert [(m.role, m.content) for m in sent.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert (sent.mode, sent.max_new_tokens, sent.temperature, sent.HasField("seed")) == ("single:beta", 9, 0.0, False)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == "Hello, world"
    assert reply.object == "chat.completion"


async def test_stream_chunks_provenance_usage_and_done(scripted):
    servicer, gateway = scripted
    body = {"model": "cool", "prompt": "x", "stream": True, "n": 2, "stream_options": {"include_usage": True}}
    async with httpx2.AsyncClient(timeout=HANG_GUARD_S) as http:
        response = await http.post(
            f"{gateway.url}/v1/completions", json=body, headers={"authorization": "Bearer s3cret"}
        )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    data = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 6,
        "total_tokens": 13,
    }
    for index in (0, 1):
        mine = [c for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert "".join(c["choices"][0]["text"] for c in mine) == "Hello, world"
        assert [c["choices"][0]["finish_reason"] for c in mine] == [None, None, None, "length"]
        assert [c["coolfusion"]["segment"]["model"] for c in mine[:-1]] == ["alpha", "beta", "alpha"]
        assert mine[-1]["coolfusion"]["usage"]["alpha"]["output_tokens"] == 3
        assert all(c["usage"] is None and c["object"] == "text_completion" for c in mine)


async def test_chat_stream_with_the_openai_client(scripted):
    _, gateway = scripted
    stream = await _client(gateway).chat.completions.create(
        model="cool", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello, world"
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None
    assert chunks[1].model_extra["coolfusion"]["segment"]["text"] == ","


@pytest.mark.parametrize(
    "kwargs, status, param",
    [
        (dict(model="cool", prompt="x", temperature=2.5), 400, "temperature"),
        (dict(model="cool", prompt="x", n=0), 400, "n"),
        (dict(model="cool", prompt=[]), 400, "prompt"),
        (dict(model="cool", prompt="x", logprobs=2), 400, "logprobs"),
        (dict(model="cool", prompt="x", extra_body={"coolfusion": {"beam": 2}}), 400, "coolfusion.beam"),
        (dict(model="cool", prompt="bad"), 400, None),
        (dict(model="gpt-5", prompt="x"), 404, "model"),
        (dict(model="cool", prompt="x", extra_body={"coolfusion": {"mode": "single:gamma"}}), 404, "coolfusion.mode"),
        (dict(model="cool", prompt="busy"), 429, None),
        (dict(model="cool", prompt="down"), 503, None),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_errors_are_openai_error_objects(scripted, kwargs, status, param, stream):
    _, gateway = scripted
    with pytest.raises(openai.APIStatusError) as caught:
        await _client(gateway).completions.create(stream=stream, **kwargs)
    error = caught.value
    assert error.status_code == status
    assert set(error.body) == {"message", "type", "param", "code"} and error.body["message"]
    assert error.body["param"] == param
    if status == 429:
        assert error.response.headers["retry-after"] == "1"


async def test_bad_or_missing_token_is_401(scripted):
    _, gateway = scripted
    with pytest.raises(openai.AuthenticationError) as caught:
        await _client(gateway, "wrong").completions.create(model="cool", prompt="x")
    assert caught.value.status_code == 401 and caught.value.body["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        await _client(gateway, "wrong").models.list()
    async with httpx2.AsyncClient(timeout=HANG_GUARD_S) as http:  # no Authorization header at all
        response = await http.post(
            f"{gateway.url}/v1/chat/completions", json={"model": "cool", "messages": [{"role": "user", "content": "x"}]}
        )
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthenticated"


async def test_error_after_the_first_segment_is_an_error_event(scripted):
    _, gateway = scripted
    stream = await _client(gateway).completions.create(model="cool", prompt="fail-late", stream=True)
    texts = []
    with pytest.raises(openai.APIError, match="worker gone mid-stream"):
        async for chunk in stream:
            texts.append(chunk.choices[0].text)
    assert texts == ["Hello"]


async def test_disconnect_cancels_the_grpc_stream(scripted):
    servicer, gateway = scripted
    servicer.cancelled.clear()
    stream = await _client(gateway).completions.create(model="cool", prompt="hold", stream=True)
    first = await stream.__anext__()
    assert first.choices[0].text == "Hello"
    await asyncio.wait_for(servicer.held.wait(), HANG_GUARD_S)
    await stream.close()  # the HTTP connection goes away mid-stream
    await asyncio.wait_for(servicer.cancelled.wait(), HANG_GUARD_S)


@pytest.mark.parametrize("prompt, stream", [("hold", False), ("hold-first", True)])
async def test_disconnect_before_the_answer_cancels_the_generation(scripted, prompt, stream):
    servicer, gateway = scripted
    servicer.held.clear()
    servicer.cancelled.clear()
    call = asyncio.create_task(_client(gateway).completions.create(model="cool", prompt=prompt, stream=stream))
    await asyncio.wait_for(servicer.held.wait(), HANG_GUARD_S)  # the gRPC call is in the orchestrator
    counted = ("coolfusion_gateway_requests_total", {"route": "/v1/completions", "status": "499"})
    before = _sample(httpx2.get(f"{gateway.url}/metrics").text, *counted)
    call.cancel()  # the client gives up: its connection closes
    await asyncio.wait_for(servicer.cancelled.wait(), HANG_GUARD_S)
    deadline = time.monotonic() + HANG_GUARD_S  # the gateway counts the request once its handler returns
    while _sample(httpx2.get(f"{gateway.url}/metrics").text, *counted) == before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert _sample(httpx2.get(f"{gateway.url}/metrics").text, *counted) == before + 1


def _sample(text: str, name: str, labels: dict | None = None) -> float:
    """The value of one sample of the Prometheus text ``text`` (0 when it is not there yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return sample.value
    return 0.0


async def test_deadline_is_504(scripted):
    _, gateway = scripted
    async with GatewayThread(gateway.app.state.upstream.address, request_timeout=0.5) as short:
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as caught:
                await _client(short).completions.create(model="cool", prompt="slow", stream=stream)
            assert caught.value.status_code == 504 and caught.value.body["code"] == "deadline_exceeded"


async def test_health_follows_the_orchestrator_and_metrics_count(scripted):
    _, gateway = scripted
    # The counters are process-wide: this test's own requests must add exactly one to each.
    counted = {
        ("coolfusion_gateway_requests_total", "/v1/completions", "404"): 1,
        ("coolfusion_gateway_requests_total", "/health", "200"): 1,
        ("coolfusion_gateway_time_to_first_token_seconds_count", "", ""): 1,
        ("coolfusion_gateway_tokens_per_second_count", "", ""): 1,
    }

    def values(text: str) -> dict:
        return {k: _sample(text, k[0], {"route": k[1], "status": k[2]} if k[1] else None) for k in counted}

    before = values(httpx2.get(f"{gateway.url}/metrics").text)
    async for _ in await _client(gateway).completions.create(model="cool", prompt="x", stream=True):
        pass
    async with httpx2.AsyncClient(timeout=HANG_GUARD_S) as http:
        assert (await http.get(f"{gateway.url}/health")).json() == {"status": "SERVING"}
        async with GatewayThread("127.0.0.1:1") as nowhere:  # nothing listens on port 1
            down = await http.get(f"{nowhere.url}/health")
            live = await http.get(f"{nowhere.url}/health/live")
        assert (down.status_code, live.status_code) == (503, 200)
        unknown = await http.post(
            f"{gateway.url}/v1/completions",
            json={"model": "nope", "prompt": "x"},
            headers={"Authorization": "Bearer s3cret"},
        )
        assert unknown.status_code == 404
        expected = {k: before[k] + n for k, n in counted.items()}
        deadline = time.monotonic() + HANG_GUARD_S  # each is counted once its handler returned
        while (now := values((await http.get(f"{gateway.url}/metrics")).text)) != expected:
            assert time.monotonic() < deadline, (now, expected)
            await asyncio.sleep(0.05)


async def test_unknown_route_is_an_error_object(scripted):
    _, gateway = scripted
    async with httpx2.AsyncClient(timeout=HANG_GUARD_S) as http:
        response = await http.post(f"{gateway.url}/v1/embeddings", json={})
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_listening_socket_disables_nagle():
    """Accepted connections inherit TCP_NODELAY; without it every response on a kept-alive
    connection waits ~40 ms for the client's delayed ACK (time to first token over HTTP)."""
    import socket

    gateway = GatewayThread("127.0.0.1:1")
    try:
        assert gateway.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        gateway.sock.close()


def test_grpc_status_table():
    from coolfusion.services.gateway.errors import GRPC_TO_HTTP

    expected = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429}
    expected |= {"UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
    assert {code.name: GRPC_TO_HTTP[code][0] for code in grpc.StatusCode if code.name in expected} == expected


async def test_http_healthcheck_command(scripted):
    from coolfusion.clients.cli import main

    _, gateway = scripted
    assert await asyncio.to_thread(main, ["healthcheck", f"127.0.0.1:{gateway.port}", "--http"]) == 0
    async with GatewayThread("127.0.0.1:1") as nowhere:  # ready only while its orchestrator serves
        assert await asyncio.to_thread(main, ["healthcheck", f"127.0.0.1:{nowhere.port}", "--http"]) == 1
