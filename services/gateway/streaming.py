"""``stream: true``: the choices' gRPC streams merged into OpenAI chunks, ending ``data: [DONE]``.

The first message of every stream is read before the HTTP response starts, so an error the
orchestrator raises up front (bad request, unknown model, overload, auth) still gets its own
HTTP status. A later error becomes an error event. However the generator ends (finished, client
gone, error), every gRPC call is cancelled, which frees the workers' sessions.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import grpc

from coolfusion.protos import fusion_pb2 as pb
from coolfusion.protos.fusion_wire import segment_json

from .errors import from_rpc_error
from .translate import Choice, final_provenance, finish_reason, usage_object


@dataclass
class ChunkFormat:
    ident: str
    created: int
    model: str
    chat: bool
    include_usage: bool
    started_roles: set[int] = field(default_factory=set)

    def chunk(self, choices: list[dict], extension: dict | None = None) -> str:
        body: dict = {
            "id": self.ident,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = None  # OpenAI: null on every chunk but the last
        if extension is not None:
            body["coolfusion"] = extension
        return json.dumps(body, ensure_ascii=False)

    def choice(self, index: int, text: str | None, reason: str | None) -> dict:
        item: dict = {"index": index, "logprobs": None, "finish_reason": reason}
        if not self.chat:
            item["text"] = text or ""
            return item
        delta: dict = {}
        if index not in self.started_roles:
            self.started_roles.add(index)
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        item["delta"] = delta
        return item

    def item_chunk(self, index: int, item: pb.GenerateStreamResponse) -> str:
        if item.HasField("segment"):
            segment = item.segment
            return self.chunk(
                [self.choice(index, segment.text, None)], {"choice": index, "segment": segment_json(segment)}
            )
        final = item.final
        return self.chunk(
            [self.choice(index, None, finish_reason(final.finish_reason))],
            {"choice": index, **final_provenance(final)},
        )

    def usage_chunk(self, usage: dict) -> str:
        body = json.loads(self.chunk([]))
        body["usage"] = usage
        return json.dumps(body)


async def open_streams(calls: Sequence[grpc.aio.UnaryStreamCall]) -> list:
    """The first message of each call; on any error every call is cancelled and the error raised."""
    try:
        return list(await asyncio.gather(*(call.read() for call in calls)))
    except BaseException:
        for call in calls:
            call.cancel()
        raise


async def _pump(index: int, call, first, queue: asyncio.Queue) -> None:
    item = first
    try:
        while item is not grpc.aio.EOF:
            await queue.put((index, item))
            item = await call.read()
    except grpc.RpcError as exc:
        await queue.put((index, exc))
        return
    await queue.put((index, None))


async def sse_events(
    fmt: ChunkFormat,
    choices: Sequence[Choice],
    calls: Sequence[grpc.aio.UnaryStreamCall],
    firsts: Sequence,
    on_done: Callable[[int], None],
) -> AsyncIterator[dict]:
    """``on_done(completion_tokens)`` runs once every choice finished."""
    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(i, call, first, queue)) for i, (call, first) in enumerate(zip(calls, firsts))]
    usages: list = [[] for _ in choices]
    try:
        remaining = len(calls)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, grpc.RpcError):
                yield {"data": json.dumps(from_rpc_error(item).body())}
                return
            else:
                if item.HasField("final"):
                    usages[index] = list(item.final.usage)
                yield {"data": fmt.item_chunk(choices[index].index, item)}
        usage = usage_object(choices, usages)
        on_done(usage["completion_tokens"])
        if fmt.include_usage:
            yield {"data": fmt.usage_chunk(usage)}
        yield {"data": "[DONE]"}
    finally:
        for task in tasks:
            task.cancel()
        for call in calls:
            call.cancel()
