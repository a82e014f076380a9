"""An in-process service tree for tests: real gRPC servers on loopback ports, real models.

Tokenizer service, one worker server per model (plus ``smollm2b``, a second copy of SmolLM2
for the "fusing two copies equals greedy" oracle) and the orchestrator, all in the test's event
loop; model compute runs on the workers' own threads as in production.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from coolfusion.orchestrator.server import build_service as build_orchestrator
from coolfusion.protos import worker_pb2_grpc
from coolfusion.services.common.server import GrpcService
from coolfusion.services.sources import parse_specs
from coolfusion.services.tokenizer.client import TokenizerClient
from coolfusion.services.tokenizer.core import TokenizerCore, TokenizerRegistry
from coolfusion.services.tokenizer.loading import load_registry
from coolfusion.services.tokenizer.server import build_service as build_tokenizer_service
from coolfusion.services.worker.model import WorkerCore
from coolfusion.services.worker.server import SERVICE_NAME as WORKER_SERVICE
from coolfusion.services.worker.server import WorkerServicer

# The data lives beside the checkout (../shared/data/gsm8k); a clone without it uses the first
# rows kept in tests/data/gsm8k (all the prompts the tests build).
_SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
GSM8K = Path(
    os.environ.get("COOLFUSION_GSM8K_DIR")
    or (_SHARED_GSM8K if _SHARED_GSM8K.exists() else Path(__file__).parent / "data" / "gsm8k")
)


# Gemma-3's sliding-window layers attend to the last 512 tokens. The in-process copy the tests
# load attends to the last GEMMA_WINDOW instead, so that a two-shot prompt (~280 tokens) crosses
# the window twice and every window path (chunked prefill, trimming, rollback, batched rows, the
# prefix cache) is checked at less than half the prompt length: a Gemma-3 forward costs time in
# proportion to its tokens. Oracle and worker share the model, so each comparison is unchanged;
# the llama.cpp tests and the service subprocesses run the shipped window.
GEMMA_WINDOW = 128

# Threads for a model a test runs itself (llama-cpp-python's own ``Llama`` as an oracle): the test
# process's share of the cores (conftest.py), as the workers get. More threads than that spin on
# ggml's barriers against the other test process.
ORACLE_THREADS = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


def gsm8k_rows(split: str, n: int, start: int = 0) -> list[dict]:
    rows = []
    with open(GSM8K / f"{split}.jsonl") as fh:
        for i, line in enumerate(fh):
            if i >= start:
                rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def gsm8k_prompt(index: int = 0, shots: int = 1) -> str:
    """lm-eval style few-shot prompt for GSM8K test question ``index`` (one shot: ~170 tokens)."""
    parts = [f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in gsm8k_rows("train", shots)]
    question = gsm8k_rows("test", 1, start=index)[0]["question"]
    return "".join(parts) + f"Question: {question}\nAnswer:"


def winner_text(segment) -> str:
    """The winning candidate's whole text (a segment's own text is cut at a stop sequence)."""
    return next(c.text for c in segment.candidates if c.model == segment.model)


@dataclass
class Cluster:
    registry: object
    cores: dict
    tokenizer_address: str
    worker_addresses: dict
    address: str
    services: list


async def start_cluster(
    models: dict | None = None, llamacpp: tuple[str, ...] = (), internal_token: str = ""
) -> Cluster:
    """``models``: name -> loaded model (``conftest.Bundled``: ``spec``, ``model``,
    ``hf_tokenizer``) to share; without it each bundled model is loaded here. ``llamacpp``: the
    workers (of smollm2, gemma3, smollm2b) that run on the llama.cpp backend instead, each with
    its own context. ``internal_token``: the workers and the tokenizer service require it, and
    their callers send it ("": the inside is open, whatever $COOLFUSION_INTERNAL_TOKEN says)."""
    tokens = [internal_token] if internal_token else []
    specs = parse_specs("smollm2,gemma3")
    if models:
        registry = TokenizerRegistry(TokenizerCore(s.name, models[s.name].hf_tokenizer, s.describe()) for s in specs)
    else:
        registry = load_registry(specs)
    # The second SmolLM2 copy gets its own name and tokenizer id.
    copy_spec = dataclasses.replace(specs[0], name="smollm2b")
    registry.add(TokenizerCore("smollm2b", registry.get("smollm2").hf, copy_spec.describe()))
    services: list[GrpcService] = []
    tok_service = build_tokenizer_service(registry, tokens=tokens)
    tok_port = await tok_service.start()
    services.append(tok_service)
    tokenizer_address = f"127.0.0.1:{tok_port}"
    boundary = TokenizerClient(tokenizer_address, token=internal_token)

    cores, addresses = {}, {}
    for spec in [*specs, copy_spec]:
        shared = {}
        if spec.name in llamacpp:
            shared = dict(backend="llamacpp", hf_tokenizer=registry.get(spec.name).hf)
        elif spec is copy_spec and cores["smollm2"].backend == "transformers":  # same weights, own sessions
            shared = dict(model=cores["smollm2"].model, hf_tokenizer=cores["smollm2"].tokenizer.hf)
        elif models:
            loaded = models["smollm2" if spec is copy_spec else spec.name]
            shared = dict(model=loaded.model, hf_tokenizer=loaded.hf_tokenizer)
        core = WorkerCore(
            spec.name, spec, device="cpu", boundary=boundary.common_boundary, **{"backend": "transformers", **shared}
        )
        servicer = WorkerServicer(core)
        service = GrpcService(
            lambda server, s=servicer: worker_pb2_grpc.add_ModelWorkerServicer_to_server(s, server),
            [WORKER_SERVICE],
            internal_tokens=tokens,
        )
        port = await service.start()
        services.append(service)
        cores[spec.name] = core
        addresses[spec.name] = f"127.0.0.1:{port}"

    orchestrator, _ = build_orchestrator(addresses, tokenizer_address=tokenizer_address, internal_token=internal_token)
    port = await orchestrator.start()
    services.append(orchestrator)
    return Cluster(registry, cores, tokenizer_address, addresses, f"127.0.0.1:{port}", services)


async def stop_cluster(cluster: Cluster) -> None:
    for service in reversed(cluster.services):
        await service.stop(0)


# A bound on waits for events that should come within seconds: only against a hang (on a loaded
# 2-core machine a generation step can take seconds), never a speed goal.
HANG_GUARD_S = 300.0


async def wait_no_sessions(cluster: Cluster, timeout: float = HANG_GUARD_S) -> dict:
    """Each in-process worker's live sessions, once none has any (or as they are at ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        live = {name: core.info()["live_sessions"] for name, core in cluster.cores.items()}
        if not any(live.values()) or time.monotonic() > deadline:
            return live
        await asyncio.sleep(0.1)


class GatedWorker:
    """A worker handle whose ``at``-th NextText (counting from 1) waits for ``gate``: a test holds
    a generation at a known point (``reached`` is set when it gets there) instead of hoping that
    the machine is slow enough. Everything else goes to the wrapped handle."""

    def __init__(self, inner, at: int = 2):
        import asyncio

        self.inner, self.name, self.at = inner, inner.name, at
        self.calls = 0
        self.reached = asyncio.Event()
        self.gate = asyncio.Event()

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    async def next_text(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            self.reached.set()
            await self.gate.wait()
        return await self.inner.next_text(*args, **kwargs)


def gate_worker(engine, name: str, at: int = 2) -> GatedWorker:
    """Replace ``engine``'s handle of ``name`` by a ``GatedWorker`` around it."""
    gated = GatedWorker(engine.workers[name], at)
    engine.workers[name] = gated
    return gated


def sliding_window(model) -> int | None:
    """The window of a transformers model's sliding-window layers (None: it has none)."""
    return getattr(getattr(model.config, "text_config", model.config), "sliding_window", None)


def narrow_sliding_window(model, window: int) -> None:
    """Make a loaded transformers model's sliding-window layers attend to ``window`` tokens: the
    config (masks and caches read it per call) and each sliding attention module (read at init)."""
    assert sliding_window(model) and window < sliding_window(model)
    getattr(model.config, "text_config", model.config).sliding_window = window
    for module in model.modules():
        if getattr(module, "sliding_window", None):
            module.sliding_window = window
