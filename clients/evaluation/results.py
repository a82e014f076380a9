"""The results file of an eval run: one JSON object per line, appended as work finishes.

An interrupted run (Ctrl-C, SIGINT, a killed process) can leave its last line cut. Resuming
first rewrites the file with the complete rows only, so the next row never lands glued onto a
cut one (which would lose both), then appends.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable
from pathlib import Path


class ResultsFile:
    def __init__(self, path: Path, key: Callable[[dict], Hashable]):
        self.path = path
        self.key = key
        self.rows: dict[Hashable, dict] = {}
        self._sink = None

    def load(self) -> dict[Hashable, dict]:
        """Rows already finished, by key; a cut or unparsable line is dropped from the file."""
        if not self.path.exists():
            return self.rows
        text = self.path.read_text(encoding="utf-8")
        good = []
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # cut by an interruption: that work runs again
            if isinstance(row, dict):
                self.rows[self.key(row)] = row
                good.append(line)
        clean = "".join(line + "\n" for line in good)
        if clean != text:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(clean, encoding="utf-8")
            os.replace(tmp, self.path)
        return self.rows

    def __enter__(self) -> ResultsFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.load()
        self._sink = open(self.path, "a", encoding="utf-8")
        return self

    def __exit__(self, *exc) -> None:
        if self._sink:
            self._sink.close()
            self._sink = None

    def add(self, row: dict) -> None:
        """Append one finished row; one write of a whole line, flushed."""
        self.rows[self.key(row)] = row
        self._sink.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._sink.flush()
