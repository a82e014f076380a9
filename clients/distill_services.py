"""What ``coolfusion distill prepare`` needs from the clients' side: the task files' texts in the
evaluation's formats, the services it starts (embedded, the default) and a running deployment's
workers (``--connect``).

Embedded: a tokenizer service hosting every source's and the target's tokenizer and one worker per
source, started as local processes the way ``coolfusion generate`` starts them (``launcher.py``),
without an orchestrator. ``--connect``: the orchestrator names its workers' addresses
(``ListModels``); the tokenizer service's address is given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import grpc

from ..distill.corpus import CorpusError
from ..distill.remote import Remote, RemoteError
from .client import SyncFusionClient
from .launcher import LocalCluster


def task_texts(task: str, path: Path) -> list[str]:
    """A task file's texts as ``coolfusion eval`` prompts them, with the correct answer: ARC
    ``Question: {q}\nAnswer: {choice}``, GSM8K ``Question: {q}\nAnswer: {solution}``."""
    from .evaluation import choice, generation
    from .evaluation.runner import EvalDataError

    try:
        if task == "gsm8k":
            return [generation.few_shot_prefix([item]).rstrip("\n") for item in generation.load_items(path)]
        return [
            choice.choice_prompt(item.question) + choice.continuation(item.choices[item.answer])
            for item in choice.load_choice_items(path)
        ]
    except EvalDataError as exc:
        raise CorpusError(str(exc)) from None


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
