"""One module per ``coolfusion`` subcommand: each has ``add_parser(sub)`` and a ``run(args)``.

``clients/cli.py`` builds the parser from ``SUBCOMMANDS`` in this order (the order of ``--help``).
"""

from __future__ import annotations

SUBCOMMANDS = (
    "generate",
    "serve",
    "tokenizer",
    "worker",
    "orchestrator",
    "gateway",
    "eval",
    "distill",
    "drain",
    "healthcheck",
)
# Long-running services: INFO logs by default (the other commands log WARNING and above).
SERVICES = ("tokenizer", "worker", "orchestrator", "gateway", "drain")


def log_level(args) -> str:
    """--log-level (or $COOLFUSION_LOG_LEVEL) when given; else INFO for services, WARNING otherwise."""
    return args.log_level or ("INFO" if args.command in SERVICES else "WARNING")
