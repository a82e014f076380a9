"""The services ``prepare`` calls: one worker per source and the tokenizer service.

Embedded (the default): a tokenizer service hosting every source's and the target's tokenizer and
one worker per source, started as local processes the way ``coolfusion generate`` starts them
(``clients/launcher.py``), without an orchestrator. ``--connect``: a running deployment, whose
orchestrator names its workers' addresses (``ListModels``) and whose tokenizer service is given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import grpc

from ..clients.launcher import LocalCluster
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


class EmbeddedServices(LocalCluster):
    """A tokenizer service for ``tokenizer_models`` and one worker per source; no orchestrator."""

    def __init__(self, sources: list[str], tokenizer_models: list[str], **kwargs):
        super().__init__(sources, **kwargs)
        self.tokenizer_models = tokenizer_models
        self.tokenizer_address = ""
        self.worker_addresses: dict[str, str] = {}

    def start(self, timeout: float = 600.0) -> str:
        try:
            tok = self._spawn("tokenizer", ["tokenizer", "--models", ",".join(self.tokenizer_models), "--port", "0"], 1)
            self._wait([tok], timeout)
            self.tokenizer_address = tok.address
            threads = max(1, (os.cpu_count() or 2) // max(1, len(self.models)))
            workers = []
            for spec in self.models:
                name = spec.split("=", 1)[0]
                args = ["worker", "--model", spec, "--tokenizer-service", tok.address, "--port", "0"]
                args += ["--threads", str(threads)]
                args += ["--device", self.device] if self.device else []
                args += ["--backend", self.backend] if self.backend else []
                workers.append(self._spawn(f"worker:{name}", args, threads))
            self._wait(workers, timeout)
            self.worker_addresses = {s.name.split(":", 1)[1]: s.address for s in workers}
            return self.tokenizer_address
        except BaseException:
            self.stop()
            raise

    def remote(self) -> Remote:
        """Stubs of the started services (carrying the internal token they were started with)."""
        return Remote(self.tokenizer_address, self.worker_addresses, self.internal_token)


def connected(orchestrator: str, tokenizer_service: str, sources: Sequence[str]) -> Remote:
    """A running deployment's workers for ``sources`` (named by its orchestrator)."""
    from ..clients.client import SyncFusionClient

    client = SyncFusionClient(orchestrator, timeout=60)
    try:
        models = {m.name: m.address for m in client.list_models().models}
    except grpc.RpcError as exc:
        raise RemoteError(f"orchestrator {orchestrator}: {exc.code().name}: {exc.details()}") from None
    finally:
        client.channel.close()
    missing = [s for s in sources if s not in models]
    if missing:
        raise RemoteError(
            f"source {', '.join(missing)} is not served by {orchestrator} (it serves {', '.join(models) or 'nothing'})"
        )
    return Remote(tokenizer_service, {s: models[s] for s in sources})
