"""Tokenizer service: every configured tokenizer, word boundaries common to all of them."""

from .core import IncrementalDecoder, TokenizerCore, TokenizerError, TokenizerRegistry, UnknownTokenizerError

__all__ = ["IncrementalDecoder", "TokenizerCore", "TokenizerError", "TokenizerRegistry", "UnknownTokenizerError"]
