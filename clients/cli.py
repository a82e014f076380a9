"""The ``coolfusion`` command; each subcommand lives in ``clients/commands/<name>.py``.

    coolfusion generate "PROMPT" [--mode cool] [--models smollm2,gemma3] [--json] [--connect HOST:PORT]
    coolfusion serve [--models ...] [--port 50051]       all services, stays up
    coolfusion tokenizer --models ... [--port N]          one service each: what containers run
    coolfusion worker --model NAME[=SOURCE] --tokenizer-service ADDR [--port N]
    coolfusion orchestrator --worker NAME=ADDR ... [--port N]
    coolfusion gateway --connect ORCHESTRATOR [--port 8000]   OpenAI-compatible HTTP API
    coolfusion eval TASK                                 a benchmark task (bench/ holds the cost benchmarks)
    coolfusion healthcheck ADDR [--service NAME]
    coolfusion drain ADDR [--min-wait S] [--timeout S]   worker preStop hook (Kubernetes)

Service flags fall back to env vars (containers): COOLFUSION_HOST/PORT, tokenizer
COOLFUSION_MODELS, worker COOLFUSION_MODEL/TOKENIZER/DEVICE/THREADS/SESSION_TTL/MAX_SESSIONS/KV_BUDGET_MB, orchestrator
COOLFUSION_WORKERS="a=host:port,b=dns:///svc:50052", gateway COOLFUSION_ORCHESTRATOR (and
COOLFUSION_REQUEST_TIMEOUT).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from .. import envs
from .commands import SUBCOMMANDS, log_level
from .commands.common import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coolfusion", description="Fuse LLMs with different tokenizers, without training."
    )
    parser.add_argument(
        "--log-level",
        default=envs.read("COOLFUSION_LOG_LEVEL"),
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="default: INFO for services, WARNING for the other commands ($COOLFUSION_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=envs.read("COOLFUSION_LOG_FORMAT", "text"),
        help="json: one JSON object per line, with request_id on request logs",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__package__}.commands.{name}").add_parser(sub)
    return parser


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    from ..services.common.errors import CoolFusionError
    from ..services.sources import UnknownModelError

    args = build_parser().parse_args(argv)
    setup_logging(log_level(args), args.log_format)
    if args.command in ("generate", "eval", "distill") and threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so the services these commands started are stopped too
        # (the launcher starts them in their own process groups, where no signal follows ours).
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return args.func(args)
    except (UnknownModelError, CoolFusionError) as exc:  # a model that cannot load here, say: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
