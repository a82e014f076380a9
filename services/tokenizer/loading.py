"""Build TokenizerCores from model specs (bundled names, GGUF files, dirs, HF ids)."""

from __future__ import annotations

from ..sources import ModelSpec, load_hf_tokenizer, parse_specs
from .core import TokenizerCore, TokenizerRegistry


def load_tokenizer(spec: ModelSpec) -> TokenizerCore:
    return TokenizerCore(spec.name, load_hf_tokenizer(spec), spec.describe())


def load_registry(specs: str | list[str] | list[ModelSpec]) -> TokenizerRegistry:
    if isinstance(specs, str) or (specs and not isinstance(specs[0], ModelSpec)):
        specs = parse_specs(specs)
    return TokenizerRegistry(load_tokenizer(s) for s in specs)
