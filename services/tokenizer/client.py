"""Synchronous client of the tokenizer service, used by workers from their compute threads."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from coolfusion.protos import tokenizer_pb2 as pb
from coolfusion.protos import tokenizer_pb2_grpc as pb_grpc

from ..common.errors import Unavailable
from ..common.security import internal_token, sync_channel
from ..common.server import CHANNEL_OPTIONS
from .alignment import Alignment


class TokenizerClient:
    def __init__(self, address: str, timeout: float = 10.0, token: str | None = None):
        """``token``: the internal token every call carries (None: $COOLFUSION_INTERNAL_TOKEN's)."""
        self.address = address
        self.timeout = timeout
        # TLS from COOLFUSION_TLS_* when set.
        self.channel = sync_channel(address, CHANNEL_OPTIONS, token=internal_token(token))
        self.stub = pb_grpc.TokenizerServiceStub(self.channel)

    def wait_ready(self, timeout: float = 60.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def list_tokenizers(self) -> list[pb.TokenizerInfo]:
        return list(self.stub.ListTokenizers(pb.ListTokenizersRequest(), timeout=self.timeout).tokenizers)

    def common_boundary(
        self,
        context_tail: str,
        generated_text: str,
        tokenizer_ids: Sequence[str],
        allowed_offsets: Sequence[int] | None = None,
    ) -> int | None:
        request = pb.CommonBoundaryRequest(
            context_tail=context_tail.encode(),
            generated_text=generated_text.encode(),
            tokenizer_ids=list(tokenizer_ids),
            allowed_offsets=list(allowed_offsets or ()),
        )
        try:
            reply = self.stub.CommonBoundary(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                # Name it: the worker's caller would otherwise blame the worker.
                raise Unavailable(f"tokenizer service at {self.address} is unavailable: {exc.details()}") from None
            raise
        return reply.offset if reply.found else None

    __call__ = common_boundary

    def align(
        self,
        source: str,
        target: str,
        text: str,
        source_ids: Sequence[int],
        spans: Sequence[tuple[int, int]] | None = None,
        topk_ids: Sequence[Sequence[int]] = (),
        topk_logprobs: Sequence[Sequence[float]] = (),
        method: str = "span",
        timeout: float | None = None,
    ) -> Alignment:
        """``Align`` (see services/tokenizer/alignment.py): the target's tokens of ``text``, the
        source token aligned to each, and the source's top-k rows (one per source token) mapped
        onto the target vocabulary. Byte spans are computed by the service when not given."""
        k = len(topk_ids[0]) if topk_ids else 0
        request = pb.AlignRequest(
            source=source,
            target=target,
            text=text.encode(),
            method=method,
            source_ids=list(source_ids),
            source_starts=[s for s, _ in spans or ()],
            source_ends=[e for _, e in spans or ()],
            top_k=k,
            topk_ids=[i for row in topk_ids for i in row],
            topk_logprobs=[v for row in topk_logprobs for v in row],
        )
        reply = self.stub.Align(request, timeout=timeout or self.timeout)
        n = len(reply.target_ids)
        ids, logprobs = list(reply.mapped_ids), list(reply.mapped_logprobs)
        return Alignment(
            target_ids=list(reply.target_ids),
            target_spans=list(zip(reply.target_starts, reply.target_ends)),
            source_index=list(reply.source_index),
            mapped_ids=[ids[j * k : (j + 1) * k] for j in range(n)],
            mapped_logprobs=[logprobs[j * k : (j + 1) * k] for j in range(n)],
        )

    def close(self) -> None:
        self.channel.close()
