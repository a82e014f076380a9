"""``coolfusion orchestrator``: the public Fusion service over a set of workers."""

from __future__ import annotations

import asyncio

from ... import envs
from ...orchestrator.config import OrchestratorConfig
from ...services.common.config import add_arguments
from .common import add_rule_args, default_rule, models_arg, rule_from_args, serve


def add_parser(sub) -> None:
    o = sub.add_parser("orchestrator", help="run the public Fusion service")
    o.add_argument(
        "--worker",
        action="append",
        help="NAME=HOST:PORT | NAME=ADDR1|ADDR2 (replicas) | NAME=dns:///HOST:PORT (headless Service), "
        "in tie-break order (default: $COOLFUSION_WORKERS, comma-separated)",
    )
    add_arguments(o, OrchestratorConfig)
    o.add_argument(
        "--auth-token", action="append", help="bearer token callers must send (repeatable; env COOLFUSION_AUTH_TOKENS)"
    )
    _add_admission_args(o)
    add_rule_args(o)
    o.set_defaults(func=run)


def _add_admission_args(o) -> None:
    # Unset: the server's Limits (orchestrator/wire.py), so the defaults live in one place.
    o.add_argument("--max-messages", type=int, help="chat messages per request (default 1024)")
    o.add_argument("--max-prompt-chars", type=int, help="characters of prompt or message contents (default 200000)")
    o.add_argument(
        "--max-rendered-chars", type=int, help="characters of a context after its chat template (default 300000)"
    )


def worker_targets(items: list[str]) -> dict[str, str]:
    """``NAME=ADDRESS`` items as a name -> address map; a malformed one exits with its message."""
    from ...orchestrator.replicas import parse_worker_target

    if not items:
        raise SystemExit("give --worker NAME=HOST:PORT (repeatable) or COOLFUSION_WORKERS=NAME=HOST:PORT,...")
    workers = {}
    for item in items:
        name, sep, address = item.partition("=")
        if not sep or not name or not address:
            raise SystemExit(f"--worker takes NAME=HOST:PORT, NAME=ADDR1|ADDR2 or NAME=dns:///HOST:PORT, got {item!r}")
        try:
            parse_worker_target(address)
        except ValueError as exc:
            raise SystemExit(f"--worker {item!r}: {exc}") from None
        workers[name] = address
    return workers


def run(args) -> int:
    from ...orchestrator.server import build_service
    from ...orchestrator.wire import Limits
    from ...services.common.security import tokens_from_env
    from ...services.common.server import host_port

    workers = worker_targets(args.worker or models_arg(envs.read("COOLFUSION_WORKERS", "")))
    rule = rule_from_args(args) or default_rule()

    given = dict(
        max_prompt_chars=args.max_prompt_chars,
        max_messages=args.max_messages,
        max_rendered_chars=args.max_rendered_chars,
    )
    limits = Limits(**{k: v for k, v in given.items() if v is not None})

    def make():
        return build_service(
            workers,
            host_port(args.host, args.port),
            limits=limits,
            tokenizer_address=args.tokenizer_service,
            max_concurrent=args.max_concurrent,
            max_queue=args.max_queue,
            auth_tokens=args.auth_token or tokens_from_env(),
            score_rule=rule,
        )[0]

    asyncio.run(serve(make, "orchestrator", args.grace, args.metrics_port))
    return 0
