"""Tokenizer service: every configured tokenizer, word boundaries common to all of them.

The names below come from ``core`` on first use, so that importing a plain submodule (the
orchestrator imports ``context``) does not need the ``tokenizers`` package."""

__all__ = ["IncrementalDecoder", "TokenizerCore", "TokenizerError", "TokenizerRegistry", "UnknownTokenizerError"]


def __getattr__(name: str):
    if name in __all__:
        from . import core

        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
