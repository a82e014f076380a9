"""Async handles on model workers, as the fusion loop sees them.

``RemoteWorker`` talks to a worker process over grpc.aio. The loop only needs the small
``WorkerHandle`` surface below, so tests can also drive it with in-process cores. Its calls
return the worker core's own result types (``services/worker/results.py``), which
``services/worker/wire.py`` converts from the protos for both sides. Several replicas of one
model are one handle too (``replicas.py``).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from asyncio_throttle import Throttler

from coolfusion.protos import worker_pb2 as pb
from coolfusion.protos import worker_pb2_grpc as pb_grpc

from ..services.common.errors import Unavailable
from ..services.common.security import aio_channel, internal_token
from ..services.common.server import CHANNEL_OPTIONS
from ..services.worker import wire
from ..services.worker.api import NextTextOptions
from ..services.worker.results import CandidateScore, CommitResult, NextTextResult, OpenResult


@dataclass
class WorkerInfo:
    name: str
    model_id: str
    tokenizer_id: str
    dtype: str
    device: str
    eos_token_ids: list[int] = field(default_factory=list)
    has_chat_template: bool = False
    address: str = ""
    parameters: int = 0
    context_length: int = 0  # most tokens a session holds (0: unknown)
    backend: str = ""  # what runs the worker's forwards ("transformers", "llamacpp")


class WorkerHandle(Protocol):
    name: str

    async def info(self) -> WorkerInfo: ...
    async def open(self, prompt: str | None, messages: list[dict] | None) -> OpenResult: ...
    async def next_text(self, session_id: str, options: NextTextOptions) -> NextTextResult: ...
    # Optional keyword (a performance switch): score(..., own_state_id=""). A ``CandidateScores``
    # also carries the worker's time in the call; a plain list counts as none.
    async def score(self, session_id: str, candidates: Sequence[tuple[str, bool]]) -> list[CandidateScore]: ...
    async def update_state(self, session_id: str, state_id: str) -> CommitResult: ...
    async def close(self, session_id: str) -> None: ...


# Monotonic time by which the current request's caller gives up (set per request by the Fusion
# servicer from ``context.time_remaining()``; copied into the tasks the request fans out to).
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("coolfusion_deadline", default=None)


def call_deadline(seconds: float | None) -> None:
    """Give every worker call of the current request at most ``seconds`` from now (None: no deadline)."""
    _DEADLINE.set(None if seconds is None else time.monotonic() + max(0.0, seconds))


def call_timeout(default: float | None) -> float | None:
    """The timeout for a worker call now: the caller's remaining time, capped by ``default``."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return default
    remaining = max(0.001, deadline - time.monotonic())
    return remaining if default is None else min(default, remaining)


class RemoteWorker:
    """A worker process reached over gRPC; fan-out calls are rate-capped by asyncio-throttle."""

    def __init__(
        self,
        name: str,
        address: str,
        rate_limit: int = 2000,
        timeout: float | None = 600.0,
        token: str | None = None,
    ):
        """``token``: the internal token every call carries (None: $COOLFUSION_INTERNAL_TOKEN's)."""
        self.name = name
        self.address = address
        self.timeout = timeout
        # TLS/mTLS from COOLFUSION_TLS_* when set.
        self.channel = aio_channel(address, CHANNEL_OPTIONS, token=internal_token(token))
        self.stub = pb_grpc.ModelWorkerStub(self.channel)
        self.throttler = Throttler(rate_limit=rate_limit, period=1.0)

    async def _call(self, method, request, bounded: bool = True):
        """``bounded``: within the caller's deadline (``call_deadline``); Close is not, it must
        free the session even after the caller gave up."""
        async with self.throttler:
            try:
                return await method(
                    request, timeout=call_timeout(self.timeout) if bounded else min(self.timeout or 30.0, 30.0)
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    # Name the worker: "connection refused" alone does not say which model is down.
                    raise Unavailable(f"worker {self.name} at {self.address} is unavailable: {exc.details()}") from exc
                raise

    async def info(self) -> WorkerInfo:
        r = await self._call(self.stub.Info, pb.InfoRequest())
        return WorkerInfo(
            name=r.name,
            model_id=r.model_id,
            tokenizer_id=r.tokenizer_id,
            dtype=r.dtype,
            device=r.device,
            eos_token_ids=list(r.eos_token_ids),
            has_chat_template=r.has_chat_template,
            address=self.address,
            parameters=r.parameters,
            context_length=r.context_length,
            backend=r.backend,
        )

    async def open(self, prompt: str | None, messages: list[dict] | None) -> OpenResult:
        return wire.open_from_proto(await self._call(self.stub.Open, wire.open_request(prompt, messages)))

    async def next_text(self, session_id: str, options: NextTextOptions) -> NextTextResult:
        request = wire.next_text_request(session_id, options)
        return wire.next_text_from_proto(await self._call(self.stub.NextText, request))

    async def score(
        self, session_id: str, candidates: Sequence[tuple[str, bool]], own_state_id: str = ""
    ) -> list[CandidateScore]:
        request = wire.score_request(session_id, candidates, own_state_id)
        return wire.scores_from_proto(await self._call(self.stub.ScoreCandidates, request))

    async def update_state(self, session_id: str, state_id: str) -> CommitResult:
        request = pb.UpdateStateRequest(session_id=session_id, state_id=state_id)
        return wire.commit_from_proto(await self._call(self.stub.UpdateState, request))

    async def close(self, session_id: str) -> None:
        await self._call(self.stub.Close, pb.CloseRequest(session_id=session_id), bounded=False)

    async def aclose(self) -> None:
        await self.channel.close()
