"""The services ``prepare`` calls: one worker per source and the tokenizer service.

``Remote`` holds clients of them by address: the services ``clients/distill_services.py`` starts
(embedded, the default) or those of a running deployment (``--connect``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..protos import tokenizer_pb2, worker_pb2, worker_pb2_grpc
from ..services.common import security
from ..services.common.server import CHANNEL_OPTIONS
from ..services.worker.results import TextDistributions


class RemoteError(ValueError):
    """A deployment that cannot serve this prepare (one line, exit 2)."""


class Remote:
    """Synchronous clients of the tokenizer service and each source's worker.

    ``token``: the internal token every call carries (None: $COOLFUSION_INTERNAL_TOKEN's)."""

    def __init__(self, tokenizer_address: str, workers: dict[str, str], token: str | None = None):
        from ..services.tokenizer.client import TokenizerClient

        token = security.internal_token(token)
        self.tokenizer = TokenizerClient(tokenizer_address, timeout=600.0, token=token)
        self.worker_channels = {
            name: security.sync_channel(address, CHANNEL_OPTIONS, token=token) for name, address in workers.items()
        }

    def tokenizers(self) -> dict[str, tokenizer_pb2.TokenizerInfo]:
        return {t.id: t for t in self.tokenizer.list_tokenizers()}

    def vocab_size(self, source: str) -> int:
        stub = worker_pb2_grpc.ModelWorkerStub(self.worker_channels[source])
        return stub.Info(worker_pb2.InfoRequest(), timeout=60).vocab_size

    def distributions(self, source: str, texts: Sequence[str], k: int) -> list[TextDistributions]:
        """Every text's distributions from ``source``'s worker, in the order of ``texts``."""
        from ..services.worker.client import distributions_blocking

        rows: list[TextDistributions | None] = [None] * len(texts)
        for dist in distributions_blocking(self.worker_channels[source], texts, k):
            rows[dist.text_index] = dist
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            raise RemoteError(f"worker {source} answered no distributions for texts {missing}")
        return rows  # type: ignore[return-value]

    def align(self, source: str, target: str, text: str, dist: TextDistributions, method: str):
        """The target's tokens of ``text`` with ``source``'s rows aligned and mapped onto them
        (``services/tokenizer/alignment.py``'s ``Alignment``)."""
        spans = list(zip(dist.starts, dist.ends))
        return self.tokenizer.align(
            source, target, text, dist.token_ids, spans, dist.topk_ids, dist.topk_logprobs, method
        )

    def close(self) -> None:
        self.tokenizer.close()
        for channel in self.worker_channels.values():
            channel.close()
