"""Async handles on model workers, as the fusion loop sees them.

``RemoteWorker`` talks to a worker process over grpc.aio. The loop only needs the small
``WorkerHandle`` surface below, so tests can also drive it with in-process cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import grpc
from asyncio_throttle import Throttler

from coolfusion.protos import worker_pb2 as pb
from coolfusion.protos import worker_pb2_grpc as pb_grpc

from ..services.common.server import CHANNEL_OPTIONS


@dataclass
class Opened:
    session_id: str
    context_tokens: int
    context_text: str


@dataclass
class Proposal:
    """A model's candidate segment (paper T1)."""

    state_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    eos: bool
    finish: str
    generated_tokens: int
    lookahead: str = ""


@dataclass
class Score:
    state_id: str
    token_ids: list[int]
    logprobs: list[float]
    ppl: float


@dataclass
class Committed:
    committed_tokens: int
    committed_text: str


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


class WorkerHandle(Protocol):
    name: str

    async def info(self) -> WorkerInfo: ...
    async def open(self, prompt: str | None, messages: list[dict] | None) -> Opened: ...
    async def next_text(self, session_id: str, boundary_tokenizer_ids: Sequence[str], max_tokens: int) -> Proposal: ...
    async def score(self, session_id: str, candidates: Sequence[tuple[str, bool]]) -> list[Score]: ...
    async def update_state(self, session_id: str, state_id: str) -> Committed: ...
    async def close(self, session_id: str) -> None: ...


class RemoteWorker:
    """A worker process reached over gRPC; fan-out calls are rate-capped by asyncio-throttle."""

    def __init__(self, name: str, address: str, rate_limit: int = 2000, timeout: float | None = 600.0):
        self.name = name
        self.address = address
        self.timeout = timeout
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.ModelWorkerStub(self.channel)
        self.throttler = Throttler(rate_limit=rate_limit, period=1.0)

    async def _call(self, method, request):
        async with self.throttler:
            return await method(request, timeout=self.timeout)

    async def info(self) -> WorkerInfo:
        r = await self._call(self.stub.Info, pb.InfoRequest())
        return WorkerInfo(
            r.name, r.model_id, r.tokenizer_id, r.dtype, r.device, list(r.eos_token_ids), r.has_chat_template, self.address
        )

    async def open(self, prompt: str | None, messages: list[dict] | None) -> Opened:
        if messages is not None:
            request = pb.OpenRequest(
                messages=pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])
            )
        else:
            request = pb.OpenRequest(prompt=(prompt or "").encode())
        r = await self._call(self.stub.Open, request)
        return Opened(r.session_id, r.context_tokens, r.context_text)

    async def next_text(self, session_id: str, boundary_tokenizer_ids: Sequence[str], max_tokens: int) -> Proposal:
        r = await self._call(
            self.stub.NextText,
            pb.NextTextRequest(
                session_id=session_id, boundary_tokenizer_ids=list(boundary_tokenizer_ids), max_tokens=max_tokens
            ),
        )
        return Proposal(
            r.state_id, r.text, list(r.token_ids), list(r.logprobs), r.eos, r.finish, r.generated_tokens, r.lookahead
        )

    async def score(self, session_id: str, candidates: Sequence[tuple[str, bool]]) -> list[Score]:
        r = await self._call(
            self.stub.ScoreCandidates,
            pb.ScoreCandidatesRequest(
                session_id=session_id, candidates=[pb.CandidateText(text=t, eos=e) for t, e in candidates]
            ),
        )
        return [Score(s.state_id, list(s.token_ids), list(s.logprobs), s.ppl if s.token_ids else math.inf) for s in r.scores]

    async def update_state(self, session_id: str, state_id: str) -> Committed:
        r = await self._call(self.stub.UpdateState, pb.UpdateStateRequest(session_id=session_id, state_id=state_id))
        return Committed(r.committed_tokens, r.committed_text)

    async def close(self, session_id: str) -> None:
        await self._call(self.stub.Close, pb.CloseRequest(session_id=session_id))

    async def aclose(self) -> None:
        await self.channel.close()
