"""``coolfusion bench``: fused generation against the source models alone (clients/bench.py)."""

from __future__ import annotations


def add_parser(sub) -> None:
    from ..bench import add_bench_parser

    add_bench_parser(sub)
