"""``coolfusion gateway``: the OpenAI-compatible HTTP API (services/gateway/) in front of an orchestrator."""

from __future__ import annotations

import logging
import os


def add_parser(sub) -> None:
    gw = sub.add_parser("gateway", help="run the OpenAI-compatible HTTP API in front of an orchestrator")
    gw.add_argument(
        "--connect",
        default=os.environ.get("COOLFUSION_ORCHESTRATOR"),
        help="HOST:PORT of the orchestrator ($COOLFUSION_ORCHESTRATOR); TLS and token settings as every client",
    )
    gw.add_argument("--host", default=os.environ.get("COOLFUSION_HOST", "127.0.0.1"))
    gw.add_argument("--port", type=int, default=int(os.environ.get("COOLFUSION_PORT", 8000)))
    gw.add_argument(
        "--request-timeout",
        type=float,
        default=float(os.environ.get("COOLFUSION_REQUEST_TIMEOUT", 600)),
        help="deadline of each gRPC call in seconds; past it the caller gets 504 (0: none)",
    )
    gw.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    gw.set_defaults(func=run)


def run(args) -> int:
    from ...services.gateway.serve import serve
    from ..launcher import announce_ready
    from . import log_level  # the CLI's rule (INFO for services unless --log-level)

    if not args.connect:
        raise SystemExit("give --connect HOST:PORT of the orchestrator (or COOLFUSION_ORCHESTRATOR)")

    def listening(port: int) -> None:
        announce_ready("gateway", port)
        logging.getLogger("coolfusion").info("gateway serving on port %d (orchestrator %s)", port, args.connect)

    serve(args.connect, args.host, args.port, listening, args.request_timeout or None, log_level(args), args.grace)
    return 0
