"""``coolfusion eval``: accuracy of each model alone and fused (clients/evaluation/)."""

from __future__ import annotations

from .common import default_models


def add_parser(sub) -> None:
    from ..evaluation.command import add_eval_parser

    add_eval_parser(sub, default_models())
