"""``coolfusion tokenizer``: the tokenizer service (boundary checks, T2/T3) for a set of models."""

from __future__ import annotations

import asyncio

from ...services.common.config import add_arguments
from ...services.tokenizer.config import TokenizerConfig
from .common import serve


def add_parser(sub) -> None:
    t = sub.add_parser("tokenizer", help="run the tokenizer service")
    add_arguments(t, TokenizerConfig)
    t.set_defaults(func=run)


def run(args) -> int:
    from ...services.common.server import host_port
    from ...services.tokenizer.loading import load_registry
    from ...services.tokenizer.server import build_service

    registry = load_registry(args.models)
    make = lambda: build_service(registry, host_port(args.host, args.port))  # noqa: E731
    asyncio.run(serve(make, "tokenizer", args.grace, args.metrics_port))
    return 0
