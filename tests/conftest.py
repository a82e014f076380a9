"""Shared pytest fixtures (keep generic: other test modules add theirs here)."""

from __future__ import annotations

import pytest

BUNDLED_TOKENIZERS = ("smollm2", "gemma3")


@pytest.fixture(scope="session")
def tokenizer_registry():
    """The two bundled tokenizers (SmolLM2: ByteLevel BPE; Gemma-3: metaspace rule), loaded once."""
    from coolfusion.services.tokenizer.loading import load_registry

    return load_registry(",".join(BUNDLED_TOKENIZERS))
