"""The OpenAI-compatible HTTP API (FastAPI): routes over the Fusion gRPC service.

GET  /v1/models              one id per usable configuration (cool, ..., single:<model>)
POST /v1/completions         prompt(s) -> fused text
POST /v1/chat/completions    messages -> fused reply (each model applies its own chat template)
GET  /health                 readiness: 200 while the orchestrator's gRPC health is SERVING
GET  /health/live            liveness: the gateway process answers
GET  /metrics                Prometheus
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse

from ..common.security import ClientTls
from .errors import ApiError, from_rpc_error, install_handlers
from .metrics import TIME_TO_FIRST_TOKEN, TOKENS_PER_SECOND, RequestMetrics
from .schemas import ChatBody, CompletionBody, GenerationBody, unsupported_field
from .streaming import ChunkFormat, open_streams, sse_events
from .translate import Choice, chat_choices, completion_choices, completion_object
from .upstream import Upstream, call_metadata

log = logging.getLogger(__name__)
MAX_REQUEST_ID_CHARS = 64


def _request_id(request: Request, body: GenerationBody) -> str:
    """x-request-id when the caller sends one, else a fresh id; ``user`` prefixes it so the
    orchestrator's log lines of a request name its end user."""
    given = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
    return (f"{body.user}:{given}" if body.user else given)[:MAX_REQUEST_ID_CHARS]


async def _gather_or_cancel(calls: list) -> list:
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


class ClientGone(Exception):
    """The caller disconnected before its (non-streamed) answer was ready."""


async def _until_disconnect(request: Request, work):
    """``work``'s result; if the client disconnects first, ``work`` is cancelled (which cancels
    its gRPC calls and frees the workers' sessions) and ClientGone raised."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise ClientGone()


class Generation:
    """One completions or chat request: checks, the choices' gRPC calls, the response."""

    def __init__(self, upstream: Upstream, request: Request, body: GenerationBody, route: str):
        self.upstream, self.body, self.route = upstream, body, route
        self.chat = isinstance(body, ChatBody)
        self.request_id = _request_id(request, body)
        self.metadata = call_metadata(request.headers.get("authorization"), self.request_id)
        self.created = int(time.time())
        self.ident = ("chatcmpl-" if self.chat else "cmpl-") + self.request_id
        self.started = time.perf_counter()

    async def choices(self) -> list[Choice]:
        field = unsupported_field(self.body)
        if field:
            raise ApiError(400, f"{field} is not supported by this server", param=field, code="unsupported_parameter")
        await self.upstream.check_model(self.body.model, self.metadata)
        if self.body.coolfusion.mode:
            await self.upstream.check_model(self.body.coolfusion.mode, self.metadata, "coolfusion.mode")
        if self.chat:
            choices = chat_choices(self.body, self.request_id)  # type: ignore[arg-type]
        else:
            choices = completion_choices(self.body, self.request_id)  # type: ignore[arg-type]
        limit = self.upstream.max_requests
        if limit and len(choices) > limit:
            # Each choice is one generation: more than the orchestrator ever holds would be partly
            # admitted and then cancelled. Refused before any call, whatever the server's load.
            raise ApiError(
                400,
                f"{len(choices)} choices (prompts x n) exceed the {limit} generations this server holds at once; "
                "split the batch",
                param="prompt" if not self.chat else "n",
                code="too_many_choices",
            )
        return choices

    def record(self, completion_tokens: int) -> None:
        elapsed = time.perf_counter() - self.started
        if completion_tokens and elapsed > 0:
            TOKENS_PER_SECOND.labels(self.route).observe(completion_tokens / elapsed)

    async def respond(self, request: Request):
        try:
            choices = await self.choices()
            log.info(
                "%s %s: %d choice(s)", self.route, self.body.model, len(choices), extra={"request_id": self.request_id}
            )
            if self.body.stream:
                return await self._stream(request, choices)
            calls = [self.upstream.generate(c.request, self.metadata) for c in choices]
            replies = await _until_disconnect(request, _gather_or_cancel(calls))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        result = completion_object(self.ident, self.created, self.body.model, self.chat, choices, replies)
        self.record(result["usage"]["completion_tokens"])
        return JSONResponse(result, headers={"x-request-id": self.request_id})

    async def _stream(self, request: Request, choices: list[Choice]) -> EventSourceResponse:
        calls = [self.upstream.stream(c.request, self.metadata) for c in choices]
        firsts = await _until_disconnect(request, open_streams(calls))  # a client gone early cancels too
        TIME_TO_FIRST_TOKEN.labels(self.route).observe(time.perf_counter() - self.started)
        fmt = ChunkFormat(self.ident, self.created, self.body.model, self.chat, self.body.include_usage())
        events = sse_events(fmt, choices, calls, firsts, self.record)
        return EventSourceResponse(events, sep="\n", headers={"x-request-id": self.request_id})


def create_app(orchestrator: str, request_timeout: float | None = None, tls: ClientTls | None = None) -> FastAPI:
    """The gateway in front of the orchestrator at ``orchestrator`` (HOST:PORT). TLS to it from
    ``tls``, else COOLFUSION_TLS_CA (+ client cert/key) as every client; ``request_timeout``
    seconds become each gRPC call's deadline (None: none)."""
    upstream = Upstream(orchestrator, request_timeout, tls)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        upstream.open()
        yield
        await upstream.close()

    app = FastAPI(title="coolfusion", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.upstream = upstream
    install_handlers(app)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it; the status shows in the metrics

    app.add_middleware(RequestMetrics)

    @app.get("/v1/models")
    async def models(request: Request):
        metadata = call_metadata(request.headers.get("authorization"), uuid.uuid4().hex[:16])
        try:
            ids = await upstream.list_models(metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return {
            "object": "list",
            "data": [{"id": i, "object": "model", "created": 0, "owned_by": "coolfusion"} for i in ids],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        return await Generation(upstream, request, body, "/v1/completions").respond(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        return await Generation(upstream, request, body, "/v1/chat/completions").respond(request)

    @app.get("/health")
    async def health():
        status = await upstream.serving()
        return JSONResponse({"status": status}, status_code=200 if status == "SERVING" else 503)

    @app.get("/health/live")
    async def live():
        return {"status": "alive"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
