"""Admission: what a request must pass before a single ``Open``, so that a request the service
cannot take costs milliseconds and no worker's time.

``Admission`` bounds the generations held at once: at most ``max_concurrent`` run and
``max_queue`` wait; beyond that a request is refused at once instead of waiting without bound.

``ContextAdmission`` checks every limit a request's size can break. A context that does not fit a
model would otherwise be found by its worker, after the other workers had spent a whole prefill
on it (docs/performance.md, *Constants*). Here the orchestrator asks the tokenizer service for the
context each model would prefill (its own chat template, its own tokens) and checks it against
that model's context length minus ``max_new_tokens``, and checks the number of messages and the
rendered length, in one round trip that costs milliseconds whatever the request's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc

from coolfusion.protos import tokenizer_pb2 as tok_pb
from coolfusion.protos import tokenizer_pb2_grpc as tok_grpc

from ..services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from ..services.common.security import aio_channel, internal_token
from ..services.common.server import CHANNEL_OPTIONS
from .config import ORCHESTRATOR
from .workers import WorkerHandle, call_timeout

INFO_TTL_S = 60.0  # a worker's facts (tokenizer, context length) are asked again after this long


class Admission:
    """At most ``max_concurrent`` generations run and ``max_queue`` wait; beyond that a request
    is refused at once with RESOURCE_EXHAUSTED instead of waiting without bound."""

    def __init__(self, max_concurrent: int = ORCHESTRATOR.max_concurrent, max_queue: int = ORCHESTRATOR.max_queue):
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.slots = asyncio.Semaphore(max_concurrent)
        self.waiting = 0
        self.running = 0

    @property
    def capacity(self) -> int:
        """Generations held at once at most (running + queued): a larger batch never fits whole."""
        return self.max_concurrent + self.max_queue

    @contextlib.asynccontextmanager
    async def slot(self):
        if self.running >= self.max_concurrent and self.waiting >= self.max_queue:
            raise ResourceExhausted(
                f"server busy: {self.running} generations running and {self.waiting} queued (limits "
                f"{self.max_concurrent}/{self.max_queue}); retry later"
            )
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self.slots.release()


def count_request(
    tokenizer_ids: Sequence[str],
    prompt: str | None,
    messages: Sequence[dict] | None = None,
    stop_above: Mapping[str, int] | None = None,
) -> tok_pb.CountContextRequest:
    return tok_pb.CountContextRequest(
        tokenizer_ids=list(tokenizer_ids),
        stop_above=dict(stop_above or {}),
        prompt=(prompt or "").encode(),
        messages=[tok_pb.ContextMessage(role=m["role"], content=m["content"].encode()) for m in messages or ()],
    )


@dataclass(frozen=True)
class ContextLimits:
    max_messages: int = 1024
    max_rendered_chars: int = 300_000  # the chat template's text included


@dataclass(frozen=True)
class ModelFacts:
    tokenizer_id: str
    context_length: int  # 0: unknown (no token check)


class ContextAdmission:
    """``check(request, names)`` raises INVALID_ARGUMENT naming the model and the numbers when the
    request cannot fit; without a tokenizer service only the message count is checked."""

    def __init__(
        self,
        workers: Mapping[str, WorkerHandle],
        tokenizer_address: str | None = None,
        limits: ContextLimits | None = None,
        token: str | None = None,
    ):
        """``token``: the internal token of the tokenizer service (None: $COOLFUSION_INTERNAL_TOKEN's)."""
        self.workers = workers  # name -> WorkerHandle (the engine's, so replaced handles are seen)
        self.tokenizer_address = tokenizer_address
        self.limits = limits or ContextLimits()
        self._facts: dict[str, tuple[float, ModelFacts]] = {}
        self._stub: tok_grpc.TokenizerServiceStub | None = None
        if tokenizer_address:
            self._channel = aio_channel(tokenizer_address, CHANNEL_OPTIONS, token=internal_token(token))
            self._stub = tok_grpc.TokenizerServiceStub(self._channel)

    async def check(self, request, names: Sequence[str]) -> None:
        messages = request.messages
        if messages and len(messages) > self.limits.max_messages:
            raise InvalidArgument(f"request has {len(messages)} messages; the limit is {self.limits.max_messages}")
        if self._stub is None:
            return
        facts = await self._model_facts(names)
        if not facts:
            return
        # A tokenizer's count only matters up to the most room any of its models has (0: count it all).
        stop_above: dict[str, int] = {}
        for fact in facts.values():
            room = max(fact.context_length - request.max_new_tokens, 0) if fact.context_length else 0
            known = stop_above.get(fact.tokenizer_id)
            stop_above[fact.tokenizer_id] = room if known is None else max(known, room) if known and room else 0
        counts = await self._count(stop_above, request.prompt, messages)
        for name, fact in facts.items():
            tokens, chars, at_least = counts[fact.tokenizer_id]
            if chars > self.limits.max_rendered_chars:
                raise InvalidArgument(
                    f"model {name}: the rendered context has {chars} characters; the limit is "
                    f"{self.limits.max_rendered_chars}"
                )
            room = fact.context_length - request.max_new_tokens
            if fact.context_length and tokens > room:
                raise InvalidArgument(
                    f"model {name}: context has {'more than ' if at_least else ''}{tokens} tokens and "
                    f"max_new_tokens is {request.max_new_tokens}; "
                    f"its context length {fact.context_length} leaves room for {max(room, 0)} context tokens"
                )

    async def _model_facts(self, names: Sequence[str]) -> dict[str, ModelFacts]:
        """Each model's tokenizer and context length (cached); a worker that does not answer is
        left out (its Open fails, or degraded fusion drops it, as before)."""
        now = time.monotonic()
        stale = [n for n in names if n not in self._facts or now - self._facts[n][0] > INFO_TTL_S]
        infos = await asyncio.gather(*(self.workers[n].info() for n in stale), return_exceptions=True)
        for name, info in zip(stale, infos):
            tokenizer_id = "" if isinstance(info, BaseException) else str(getattr(info, "tokenizer_id", ""))
            if tokenizer_id:
                self._facts[name] = (now, ModelFacts(tokenizer_id, int(getattr(info, "context_length", 0) or 0)))
        return {n: self._facts[n][1] for n in names if n in self._facts}

    async def _count(
        self, stop_above: dict[str, int], prompt: str | None, messages
    ) -> dict[str, tuple[int, int, bool]]:
        """tokenizer id -> (tokens, rendered characters, tokens is a lower bound)."""
        assert self._stub is not None
        try:
            reply = await self._stub.CountContext(
                count_request(sorted(stop_above), prompt, messages, stop_above), timeout=call_timeout(30.0)
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                raise Unavailable(
                    f"tokenizer service at {self.tokenizer_address} is unavailable: {exc.details()}"
                ) from None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(exc.details()) from None
            if code == grpc.StatusCode.NOT_FOUND:
                raise FailedPrecondition(f"tokenizer service at {self.tokenizer_address}: {exc.details()}") from None
            raise
        return {c.tokenizer_id: (c.tokens, c.chars, c.lower_bound) for c in reply.counts}

    async def aclose(self) -> None:
        if self._stub is not None:
            await self._channel.close()
