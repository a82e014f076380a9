"""The texts ``coolfusion distill prepare`` externalizes: jsonl corpora and the task files.

A corpus spec is a task name or a path:

- ``arc-easy`` / ``arc-challenge``: the ARC train questions with their correct answer, written as
  ``coolfusion eval`` prompts them (``Question: {q}\\nAnswer: {choice}``), so distillation trains
  the text the evaluation scores;
- ``gsm8k``: the GSM8K train questions with their worked solutions, in the eval's few-shot form;
- anything else: a jsonl file of objects with a non-empty string ``text``.

The task files come from the folder ``coolfusion eval`` reads (``coolfusion.data``'s packaged copy,
or ``$COOLFUSION_DATA_DIR``). Only train splits are read: the validation splits stay for
evaluation. The held-out slice is chosen by a hash of the text, so it does not move when the corpus
grows, is reordered or is read again after a kill.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..data import data_dir

TASKS = ("arc-easy", "arc-challenge", "gsm8k")
TaskTexts = Callable[[str, Path], list[str]]


class CorpusError(ValueError):
    """A corpus that cannot be read: the message names the file (and line) in one line."""


@dataclass
class Corpus:
    texts: list[str]
    specs: list[str]
    files: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        """sha256 over the texts in order: a resumed run checks it reads the same corpus."""
        digest = hashlib.sha256()
        for text in self.texts:
            data = text.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
        return digest.hexdigest()


def task_file(task: str) -> Path:
    if task == "gsm8k":
        return data_dir() / "gsm8k" / "train.jsonl"
    name = {"arc-easy": "ARC-Easy", "arc-challenge": "ARC-Challenge"}[task]
    return data_dir() / "arc" / f"{name}-train.jsonl"


def jsonl_texts(path: Path) -> list[str]:
    """Every non-blank line is an object with a non-empty string ``text``; else an error naming it."""
    if not path.is_file():
        raise CorpusError(f"corpus not found: {path} (a jsonl file, or one of {', '.join(TASKS)})")
    texts = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"{path}:{line_no}: not JSON ({exc.msg} at column {exc.colno})") from None
                text = row.get("text") if isinstance(row, dict) else None
                if not isinstance(text, str) or not text:
                    raise CorpusError(f"{path}:{line_no}: a corpus line is an object with a non-empty string 'text'")
                texts.append(text)
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not texts:
        raise CorpusError(f"{path}: no texts")
    return texts


def load_corpus(specs: Sequence[str], limit: int = 0, task_texts: TaskTexts | None = None) -> Corpus:
    """The texts of every spec in order; ``limit`` > 0 keeps the first ``limit`` of each.

    ``task_texts(task, path)``: a task file's texts. The task formats are the evaluation's
    (``clients/distill_services.py`` passes them); without it only jsonl files are read."""
    if not specs:
        raise CorpusError("no corpus: give a jsonl file or a task name")
    corpus = Corpus([], list(specs))
    for spec in specs:
        if spec in TASKS:
            path = task_file(spec)
            if task_texts is None:
                raise CorpusError(f"{spec}: no reader for task files here (`coolfusion distill prepare` has one)")
            if not path.exists():
                raise CorpusError(f"{spec}: data file not found: {path} (set $COOLFUSION_DATA_DIR)")
            texts = task_texts(spec, path)
        else:
            path = Path(spec)
            texts = jsonl_texts(path)
        corpus.texts.extend(texts[: limit or None])
        corpus.files.append(str(path))
    return corpus


def heldout_score(text: str) -> float:
    """A stable uniform draw in [0, 1) from the text alone."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def split_heldout(texts: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out): a text is held out when its hash draw falls below ``fraction``."""
    if not 0.0 <= fraction < 1.0:
        raise CorpusError(f"--heldout is a fraction in [0, 1), got {fraction}")
    train, heldout = [], []
    for text in texts:
        (heldout if heldout_score(text) < fraction else train).append(text)
    return train, heldout
