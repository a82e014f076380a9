"""Shared pytest fixtures (keep generic: other test modules add theirs here)."""

from __future__ import annotations

import pytest
import pytest_asyncio

BUNDLED_TOKENIZERS = ("smollm2", "gemma3")


@pytest.fixture(scope="session")
def tokenizer_registry():
    """The two bundled tokenizers (SmolLM2: ByteLevel BPE; Gemma-3: metaspace rule), loaded once."""
    from coolfusion.services.tokenizer.loading import load_registry

    return load_registry(",".join(BUNDLED_TOKENIZERS))


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def cluster():
    """Tokenizer service, a worker per bundled model (+ a second SmolLM2 copy) and the
    orchestrator: real gRPC servers on loopback ports in this event loop (see cluster.py)."""
    from cluster import start_cluster, stop_cluster

    c = await start_cluster()
    yield c
    await stop_cluster(c)
