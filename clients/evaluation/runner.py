"""The loop every eval task shares: items x units of work, resumable, concurrent, then reports.

A task says which units each item needs (GSM8K: one per mode; ARC: one Score of all choices),
runs one unit through the Fusion service, and turns the rows into a summary, a table and a plot.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from .results import ResultsFile


class EvalDataError(ValueError):
    """Input data an eval cannot use (a bad row, an empty file); the message is one line."""


class Task(Protocol):
    name: str
    units: Sequence[str]

    async def run(self, client, item, unit: str, done: dict[str, dict]) -> dict: ...

    def summarize(self, rows: list[dict]) -> dict: ...

    def table(self, summary: dict) -> str: ...

    def plot(self, summary: dict, path: Path) -> None: ...

    def progress_text(self, rows: list[dict]) -> str: ...


def row_key(row: dict):
    return (row["index"], row["unit"])


async def run_task(
    task: Task,
    address: str,
    items: Sequence,
    out: Path,
    settings: dict,
    progress: Callable[[int, str], None] | None = None,
    concurrency: int = 1,
) -> dict:
    """Runs every unit of every item not already in ``out/results.jsonl``; returns the summary."""
    from ..client import FusionClient

    out.mkdir(parents=True, exist_ok=True)
    slots = asyncio.Semaphore(max(1, concurrency))
    finished = 0
    with ResultsFile(out / "results.jsonl", row_key) as results:
        async with FusionClient(address) as client:

            async def one(item) -> None:
                nonlocal finished
                async with slots:
                    done = {u: results.rows[(item.index, u)] for u in task.units if (item.index, u) in results.rows}
                    for unit in task.units:
                        if unit in done:
                            continue
                        row = await task.run(client, item, unit, done)
                        row = {"index": item.index, "unit": unit, **row}
                        results.add(row)
                        done[unit] = row
                finished += 1
                if progress:
                    progress(finished, task.progress_text(list(results.rows.values())))

            await asyncio.gather(*(one(item) for item in items))
        rows = list(results.rows.values())
    return write_reports(task, out, rows, settings)


def write_reports(task: Task, out: Path, rows: list[dict], settings: dict) -> dict:
    """table.md, summary.json and the plot, all recomputed from the rows (the JSONL) alone."""
    summary = task.summarize(rows)
    (out / "summary.json").write_text(json.dumps({"task": task.name, "settings": settings, **summary}, indent=2))
    (out / "table.md").write_text(task.table(summary))
    task.plot(summary, out / f"{task.name}.png")
    return summary


def load_rows(out: Path) -> list[dict]:
    return list(ResultsFile(out / "results.jsonl", row_key).load().values())
