"""Shared pytest fixtures (keep generic: other test modules add theirs here).

The two bundled models are loaded once per session (``bundled_models``): the in-process cluster
and every test that drives a ``WorkerCore`` directly share those weights. Tests that use them
(and tests that start model processes, marked in their modules) carry the ``slow`` marker:
``pytest -m "not slow"`` runs the fast tests alone.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest
import pytest_asyncio

BUNDLED_TOKENIZERS = ("smollm2", "gemma3")
# Fixtures that hold loaded models: a test using one is marked slow.
MODEL_FIXTURES = {"bundled_models", "cluster"}


def pytest_configure(config):
    # In-process workers run with the worker process's malloc settings (``coolfusion worker``).
    from coolfusion.services.worker.memory import limit_arenas

    limit_arenas()
    _share_cores_between_xdist_workers()
    # Worker processes the tests start run on transformers, whose oracles the suite checks;
    # test_llamacpp.py runs the llama.cpp backend (the CLI's default for GGUF on a CPU) itself.
    os.environ.setdefault("COOLFUSION_BACKEND", "transformers")


def _share_cores_between_xdist_workers() -> None:
    """Under ``pytest -n N`` each test process (and every service process it starts) gets its share
    of the cores: OpenMP threads that outnumber the cores spin against each other's barriers, which
    made the small matrix products of these models several times slower, not faster."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    share = str(max(1, (os.cpu_count() or 1) // workers))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, share)
    if "torch" in sys.modules:  # imported before this hook: it read the variables already
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tokenizer_registry():
    """The two bundled tokenizers (SmolLM2: ByteLevel BPE; Gemma-3: metaspace rule), loaded once."""
    from coolfusion.services.tokenizer.loading import load_registry

    return load_registry(",".join(BUNDLED_TOKENIZERS))


@dataclass
class Bundled:
    spec: object  # ModelSpec
    model: object  # the transformers model, CPU float32, as a worker loads it
    hf_tokenizer: object


@pytest.fixture(scope="session")
def bundled_models(tokenizer_registry) -> dict[str, Bundled]:
    """Each bundled model loaded once, as a worker loads it (CPU, float32, packed weights);
    pass ``model=`` and ``hf_tokenizer=`` to a ``WorkerCore`` to share them."""
    from coolfusion.services.sources import parse_specs
    from coolfusion.services.worker.model import WorkerCore

    loaded = {}
    for spec in parse_specs(",".join(BUNDLED_TOKENIZERS)):
        core = WorkerCore(
            spec.name, spec, device="cpu", hf_tokenizer=tokenizer_registry.get(spec.name).hf, backend="transformers"
        )
        if spec.name == "gemma3":
            from cluster import GEMMA_WINDOW, narrow_sliding_window

            narrow_sliding_window(core.model, GEMMA_WINDOW)
        loaded[spec.name] = Bundled(spec, core.model, core.tokenizer.hf)
    return loaded


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def cluster(bundled_models):
    """Tokenizer service, a worker per bundled model (+ a second SmolLM2 copy) and the
    orchestrator: real gRPC servers on loopback ports in this event loop (see cluster.py)."""
    from cluster import start_cluster, stop_cluster

    c = await start_cluster(bundled_models)
    yield c
    await stop_cluster(c)
