"""Thin grpc.aio servicer over TokenizerRegistry (all work is in core.py)."""

from __future__ import annotations

import asyncio
import threading

from coolfusion.protos import tokenizer_pb2 as pb
from coolfusion.protos import tokenizer_pb2_grpc as pb_grpc

from ..common.security import internal_tokens
from ..common.server import GrpcService
from .alignment import align
from .context import count_tokens, cuts_cleanly, render
from .core import TokenizerError, TokenizerRegistry, UnknownTokenizerError

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TokenizerService"].full_name


def _text(data: bytes, field: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizerError(
            f"{field} is not valid UTF-8: byte {exc.start} ({data[exc.start : exc.start + 1]!r})"
        ) from None


def _nonempty(items, what: str):
    if not items:
        raise TokenizerError(f"{what} must not be empty")
    return items


class TokenizerServicer(pb_grpc.TokenizerServiceServicer):
    def __init__(self, registry: TokenizerRegistry):
        self.registry = registry
        # The vocabulary pass that lets CountContext count a prefix only (a second for Gemma-3's
        # 262k tokens), done before the first request needs it.
        threading.Thread(target=lambda: [cuts_cleanly(t) for t in registry], daemon=True).start()

    # Plain (sync) handlers: the core calls take microseconds, so they run on the event loop.
    def _encode(self, r: pb.EncodeRequest) -> pb.EncodeResponse:
        enc = self.registry.get(r.tokenizer_id).encode(_text(r.text, "text"), r.continuation)
        return pb.EncodeResponse(
            ids=enc.ids, tokens=enc.tokens, starts=[s for s, _ in enc.spans], ends=[e for _, e in enc.spans]
        )

    def _decode(self, r: pb.DecodeRequest) -> pb.DecodeResponse:
        text, pending = self.registry.get(r.tokenizer_id).decode(list(r.ids), list(r.prefix_ids), r.keep_special_tokens)
        return pb.DecodeResponse(text=text, pending_bytes=pending)

    def _words(self, r: pb.WordsRequest) -> pb.WordsResponse:
        return pb.WordsResponse(starts=self.registry.get(r.tokenizer_id).word_starts(_text(r.text, "text")))

    def _boundary(self, r: pb.CommonBoundaryRequest) -> pb.CommonBoundaryResponse:
        offset = self.registry.common_boundary(
            _text(r.context_tail, "context_tail"),
            _text(r.generated_text, "generated_text"),
            list(r.tokenizer_ids),
            list(r.allowed_offsets) or None,
        )
        return pb.CommonBoundaryResponse(found=offset is not None, offset=offset or 0)

    def _align(self, r: pb.AlignRequest) -> pb.AlignResponse:
        try:
            source, target = self.registry.get(r.source), self.registry.get(r.target)
        except UnknownTokenizerError as exc:  # a name in the request, not a resource looked up
            raise TokenizerError(str(exc)) from None
        n, k = len(r.source_ids), r.top_k
        if k < 0 or len(r.topk_ids) != n * k or len(r.topk_logprobs) != n * k:
            raise TokenizerError(
                f"top_k {k} with {n} source tokens needs {n * max(k, 0)} top-k ids and log-probs,"
                f" got {len(r.topk_ids)} and {len(r.topk_logprobs)}"
            )
        if (r.source_starts or r.source_ends) and (len(r.source_starts) != n or len(r.source_ends) != n):
            raise TokenizerError(f"{n} source tokens but {len(r.source_starts)} starts, {len(r.source_ends)} ends")
        spans = list(zip(r.source_starts, r.source_ends)) if r.source_starts else None
        result = align(
            source,
            target,
            _text(r.text, "text"),
            list(r.source_ids),
            spans,
            [r.topk_ids[t * k : (t + 1) * k] for t in range(n)] if k else (),
            [r.topk_logprobs[t * k : (t + 1) * k] for t in range(n)] if k else (),
            r.method or "span",
        )
        return pb.AlignResponse(
            target_ids=result.target_ids,
            target_starts=[s for s, _ in result.target_spans],
            target_ends=[e for _, e in result.target_spans],
            source_index=result.source_index,
            mapped_ids=[i for row in result.mapped_ids for i in row],
            mapped_logprobs=[v for row in result.mapped_logprobs for v in row],
        )

    def _count_one(
        self, tokenizer_id: str, prompt: str | None, messages: list[dict] | None, stop_above: int
    ) -> pb.ContextCount:
        tokenizer = self.registry.get(tokenizer_id)
        rendered = render(tokenizer, prompt, messages)
        tokens, lower_bound = count_tokens(tokenizer, rendered, stop_above)
        return pb.ContextCount(
            tokenizer_id=tokenizer_id, tokens=tokens, chars=len(rendered.text), lower_bound=lower_bound
        )

    async def CountContext(self, request, context):
        if request.prompt and request.messages:
            raise TokenizerError("give either prompt or messages, not both")
        messages = [
            {"role": m.role, "content": _text(m.content, f"messages[{i}].content")}
            for i, m in enumerate(request.messages)
        ]
        prompt = None if messages else _text(request.prompt, "prompt")
        ids = _nonempty(request.tokenizer_ids, "tokenizer_ids")
        for tokenizer_id in ids:
            self.registry.get(tokenizer_id)  # NOT_FOUND before any work
        # Long contexts take tenths of a second per tokenizer: each in a thread (the Rust encoder
        # releases the GIL), off the event loop that answers boundary checks.
        counts = await asyncio.gather(
            *(
                asyncio.to_thread(self._count_one, t, prompt, messages or None, request.stop_above.get(t, 0))
                for t in ids
            )
        )
        return pb.CountContextResponse(counts=counts)

    async def ListTokenizers(self, request, context):
        return pb.ListTokenizersResponse(tokenizers=[pb.TokenizerInfo(**t.info()) for t in self.registry])

    async def Encode(self, request, context):
        return self._encode(request)

    async def EncodeBatch(self, request, context):
        return pb.EncodeBatchResponse(responses=[self._encode(r) for r in _nonempty(request.requests, "requests")])

    async def Decode(self, request, context):
        return self._decode(request)

    async def DecodeBatch(self, request, context):
        return pb.DecodeBatchResponse(responses=[self._decode(r) for r in _nonempty(request.requests, "requests")])

    async def Words(self, request, context):
        return self._words(request)

    async def WordsBatch(self, request, context):
        return pb.WordsBatchResponse(responses=[self._words(r) for r in _nonempty(request.requests, "requests")])

    async def CommonBoundary(self, request, context):
        return self._boundary(request)

    async def CommonBoundaryBatch(self, request, context):
        return pb.CommonBoundaryBatchResponse(
            responses=[self._boundary(r) for r in _nonempty(request.requests, "requests")]
        )

    # Alignment encodes, maps vocabularies and may run a DTW: in a thread, off the event loop that
    # answers boundary checks.
    async def Align(self, request, context):
        return await asyncio.to_thread(self._align, request)

    async def AlignBatch(self, request, context):
        requests = _nonempty(request.requests, "requests")
        return pb.AlignBatchResponse(responses=await asyncio.to_thread(lambda: [self._align(r) for r in requests]))


def build_service(
    registry: TokenizerRegistry, address: str = "127.0.0.1:0", tokens: list[str] | None = None
) -> GrpcService:
    """``tokens``: the internal tokens callers must send (None: $COOLFUSION_INTERNAL_TOKEN's)."""
    servicer = TokenizerServicer(registry)
    return GrpcService(
        lambda server: pb_grpc.add_TokenizerServiceServicer_to_server(servicer, server),
        [SERVICE_NAME],
        address,
        internal_tokens=internal_tokens() if tokens is None else tokens,
    )
