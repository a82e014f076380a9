"""Python client of the public Fusion service: asyncio first, with a small sync wrapper.

async with FusionClient("127.0.0.1:50051") as client:
    async for segment in client.stream("Question: ...", mode="cool"):
        print(segment.text, end="")

print(SyncFusionClient("127.0.0.1:50051").generate("Hello").text)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from coolfusion.protos import fusion_pb2 as pb
from coolfusion.protos import fusion_pb2_grpc as pb_grpc
from coolfusion.protos.fusion_wire import score_rule_message

from ..orchestrator.rules import ScoreRule
from ..services.common.security import ClientTls, aio_channel, sync_channel, token_metadata
from ..services.common.server import CHANNEL_OPTIONS


def _messages(messages: Sequence[dict] | None) -> list[pb.Message]:
    return [pb.Message(role=m["role"], content=m["content"]) for m in (messages or ())]


def build_request(
    prompt: str | None = None,
    messages: Sequence[dict] | None = None,
    *,
    models: Sequence[str] = (),
    mode: str = "cool",
    max_new_tokens: int = 0,
    stop: Sequence[str] = (),
    max_segment_tokens: int = 0,
    request_id: str = "",
    score_rule: ScoreRule | str | None = None,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
) -> pb.GenerateRequest:
    """``temperature`` 0: greedy; ``top_p`` 0 and ``top_k`` 0: no cut; ``seed`` None: the server
    draws one when sampling (the reply's ``seed``)."""
    return pb.GenerateRequest(
        score_rule=rule_to_proto(score_rule),
        prompt=prompt or "",
        messages=_messages(messages),
        models=list(models),
        mode=mode,
        max_new_tokens=max_new_tokens,
        stop=list(stop),
        max_segment_tokens=max_segment_tokens,
        request_id=request_id,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
    )


def build_score_request(
    prompt: str | None,
    texts: Sequence[str],
    messages: Sequence[dict] | None = None,
    *,
    models: Sequence[str] = (),
    eos: Sequence[bool] = (),
    score_rule: ScoreRule | str | None = None,
) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        score_rule=rule_to_proto(score_rule),
        prompt=prompt or "",
        messages=_messages(messages),
        texts=list(texts),
        models=list(models),
        eos=list(eos),
    )


def rule_to_proto(rule: ScoreRule | str | None) -> pb.ScoreRule | None:
    """A rule (or a rule name) as the request field; None leaves the server's default."""
    if rule is None or rule == "":
        return None
    if isinstance(rule, str):
        rule = ScoreRule.parse(rule)  # a name or a rule JSON file
    return score_rule_message(rule.name, rule.weights, rule.primary, rule.threshold)


class FusionClient:
    """``tls``/``token`` default to COOLFUSION_TLS_CA (+ client cert/key) and COOLFUSION_AUTH_TOKEN."""

    def __init__(
        self, address: str, timeout: float | None = None, tls: ClientTls | None = None, token: str | None = None
    ):
        self.address = address
        self.timeout = timeout
        self.channel = aio_channel(address, CHANNEL_OPTIONS, tls)
        self.metadata = token_metadata(token)
        self.stub = pb_grpc.FusionStub(self.channel)

    async def __aenter__(self) -> FusionClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def wait_ready(self, timeout: float = 60.0) -> None:
        await asyncio.wait_for(self.channel.channel_ready(), timeout)

    async def generate(self, prompt: str | None = None, messages=None, **options) -> pb.GenerateResponse:
        return await self.stub.Generate(
            build_request(prompt, messages, **options), timeout=self.timeout, metadata=self.metadata
        )

    async def stream_raw(
        self, prompt: str | None = None, messages=None, **options
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Every stream message: segments, then the final one."""
        call = self.stub.GenerateStream(
            build_request(prompt, messages, **options), timeout=self.timeout, metadata=self.metadata
        )
        async for item in call:
            yield item

    async def stream(self, prompt: str | None = None, messages=None, **options) -> AsyncIterator[pb.Segment]:
        async for item in self.stream_raw(prompt, messages, **options):
            if item.HasField("segment"):
                yield item.segment

    async def list_models(self) -> pb.ListModelsResponse:
        return await self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, metadata=self.metadata)

    async def score(
        self,
        prompt: str | None,
        texts: Sequence[str],
        messages=None,
        models: Sequence[str] = (),
        eos: Sequence[bool] = (),
        score_rule: ScoreRule | str | None = None,
    ) -> pb.ScoreResponse:
        request = build_score_request(prompt, texts, messages, models=models, eos=eos, score_rule=score_rule)
        return await self.stub.Score(request, timeout=self.timeout, metadata=self.metadata)


class SyncFusionClient:
    """Blocking wrapper for scripts; not for use inside a running event loop."""

    def __init__(
        self, address: str, timeout: float | None = None, tls: ClientTls | None = None, token: str | None = None
    ):
        self.channel = sync_channel(address, CHANNEL_OPTIONS, tls)
        self.metadata = token_metadata(token)
        self.stub = pb_grpc.FusionStub(self.channel)
        self.timeout = timeout

    def generate(self, prompt: str | None = None, messages=None, **options) -> pb.GenerateResponse:
        return self.stub.Generate(
            build_request(prompt, messages, **options), timeout=self.timeout, metadata=self.metadata
        )

    def stream(self, prompt: str | None = None, messages=None, **options):
        request = build_request(prompt, messages, **options)
        yield from self.stub.GenerateStream(request, timeout=self.timeout, metadata=self.metadata)

    def list_models(self) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, metadata=self.metadata)

    def score(
        self,
        prompt: str | None,
        texts: Sequence[str],
        messages=None,
        models: Sequence[str] = (),
        eos: Sequence[bool] = (),
        score_rule: ScoreRule | str | None = None,
    ) -> pb.ScoreResponse:
        request = build_score_request(prompt, texts, messages, models=models, eos=eos, score_rule=score_rule)
        return self.stub.Score(request, timeout=self.timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()
