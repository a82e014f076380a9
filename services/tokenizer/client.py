"""Synchronous client of the tokenizer service, used by workers from their compute threads."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from coolfusion.protos import tokenizer_pb2 as pb
from coolfusion.protos import tokenizer_pb2_grpc as pb_grpc

from ..common.security import sync_channel
from ..common.server import CHANNEL_OPTIONS


class TokenizerClient:
    def __init__(self, address: str, timeout: float = 10.0):
        self.address = address
        self.timeout = timeout
        self.channel = sync_channel(address, CHANNEL_OPTIONS)  # TLS from COOLFUSION_TLS_* when set
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
        reply = self.stub.CommonBoundary(
            pb.CommonBoundaryRequest(
                context_tail=context_tail.encode(),
                generated_text=generated_text.encode(),
                tokenizer_ids=list(tokenizer_ids),
                allowed_offsets=list(allowed_offsets or ()),
            ),
            timeout=self.timeout,
        )
        return reply.offset if reply.found else None

    __call__ = common_boundary

    def close(self) -> None:
        self.channel.close()
