"""The services ``prepare`` calls: one worker per source and the tokenizer service.

Embedded (the default): a tokenizer service hosting every source's and the target's tokenizer and
one worker per source, started as local processes the way ``coolfusion generate`` starts them
(``clients/launcher.py``), without an orchestrator. ``--connect``: a running deployment, whose
orchestrator names its workers' addresses (``ListModels``) and whose tokenizer service is given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from ..clients.launcher import LocalCluster
from ..protos import tokenizer_pb2, tokenizer_pb2_grpc, worker_pb2, worker_pb2_grpc
from ..services.common import security
from ..services.common.server import CHANNEL_OPTIONS
from ..services.worker.results import TextDistributions


class RemoteError(ValueError):
    """A deployment that cannot serve this prepare (one line, exit 2)."""


@dataclass
class Alignment:
    """The target's tokenization of a text and, per target token, one source's aligned row."""

    target_ids: list[int]
    starts: list[int]
    ends: list[int]
    source_index: list[int]  # the source token with the same start byte, or -1
    mapped_ids: list[list[int]]  # [n, k] on the target's vocabulary, -1: padding
    mapped_logprobs: list[list[float]]


def _channel(address: str, token: str | None) -> grpc.Channel:
    if token is None:
        return security.sync_channel(address, CHANNEL_OPTIONS)
    return security.sync_channel(address, CHANNEL_OPTIONS, token=token)


class Remote:
    """Synchronous stubs of the tokenizer service and each source's worker."""

    def __init__(self, tokenizer_address: str, workers: dict[str, str], token: str | None = None):
        self.tokenizer_address = tokenizer_address
        self.worker_addresses = dict(workers)
        self.channels = [_channel(tokenizer_address, token)]
        self.tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(self.channels[0])
        self.worker_channels = {name: _channel(address, token) for name, address in workers.items()}
        self.channels += list(self.worker_channels.values())
        self.workers = {name: worker_pb2_grpc.ModelWorkerStub(c) for name, c in self.worker_channels.items()}

    def tokenizers(self) -> dict[str, tokenizer_pb2.TokenizerInfo]:
        reply = self.tokenizer.ListTokenizers(tokenizer_pb2.ListTokenizersRequest(), timeout=60)
        return {t.id: t for t in reply.tokenizers}

    def vocab_size(self, source: str) -> int:
        return self.workers[source].Info(worker_pb2.InfoRequest(), timeout=60).vocab_size

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

    def align(self, source: str, target: str, text: str, dist: TextDistributions, k: int, method: str) -> Alignment:
        """The target's tokenization of ``text`` with ``source``'s rows aligned and mapped onto it."""
        request = tokenizer_pb2.AlignRequest(
            source=source,
            target=target,
            text=text,
            method=method,
            source_ids=dist.token_ids,
            source_starts=dist.starts,
            source_ends=dist.ends,
            top_k=k,
            topk_ids=[i for row in dist.topk_ids for i in row],
            topk_logprobs=[v for row in dist.topk_logprobs for v in row],
        )
        reply = self.tokenizer.Align(request, timeout=600)
        n = len(reply.target_ids)
        ids, lps = list(reply.mapped_ids), list(reply.mapped_logprobs)
        return Alignment(
            target_ids=list(reply.target_ids),
            starts=list(reply.target_starts),
            ends=list(reply.target_ends),
            source_index=list(reply.source_index),
            mapped_ids=[ids[j * k : (j + 1) * k] for j in range(n)],
            mapped_logprobs=[lps[j * k : (j + 1) * k] for j in range(n)],
        )

    def close(self) -> None:
        for channel in self.channels:
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
        return Remote(self.tokenizer_address, self.worker_addresses, getattr(self, "internal_token", None))


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
    return Remote(tokenizer_service, {s: models[s] for s in sources}, security.internal_token())
