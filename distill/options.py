"""``coolfusion distill prepare``'s options and their own checks (plain Python: the CLI builds its
parser from these defaults without importing the pipeline)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..services.sources import DEFAULT_MODELS

METHODS = ("span", "dtw")


class PrepareError(ValueError):
    """Bad input or a service that refuses it: one line; ``code`` is the CLI's exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclass
class PrepareOptions:
    corpus: list[str]
    out: str
    target: str = "smollm2"  # a name the tokenizer service hosts
    sources: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))  # names of served models
    k: int = 10
    method: str = "span"
    heldout: float = 0.05
    limit: int = 0  # texts per corpus (0: all)
    shard_texts: int = 64
    batch_texts: int = 8

    def settings(self, corpus) -> dict:
        """What a resumed run must share with the run that started the folder."""
        return {
            "target": self.target,
            "sources": list(self.sources),
            "k": self.k,
            "method": self.method,
            "heldout": self.heldout,
            "shard_texts": self.shard_texts,
            "batch_texts": self.batch_texts,
            "corpus": {
                "specs": corpus.specs,
                "limit": self.limit,
                "texts": len(corpus.texts),
                "sha256": corpus.fingerprint(),
            },
        }


def check_local(options: PrepareOptions) -> None:
    """The options' own errors (no service needed: the CLI checks them before starting any)."""
    if options.method not in METHODS:
        raise PrepareError(f"unknown alignment method {options.method!r}: use {' or '.join(METHODS)}")
    if options.k <= 0:
        raise PrepareError(f"k must be at least 1, got {options.k}")
    if options.shard_texts <= 0 or options.batch_texts <= 0:
        raise PrepareError("--shard-texts and --batch-texts must be at least 1")
    if not 0.0 <= options.heldout < 1.0:
        raise PrepareError(f"--heldout is a fraction in [0, 1), got {options.heldout}")
    if not options.sources or len(set(options.sources)) != len(options.sources):
        raise PrepareError(f"sources must be distinct names, got {options.sources}")
