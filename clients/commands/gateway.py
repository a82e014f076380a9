"""``coolfusion gateway``: the OpenAI-compatible HTTP API (services/gateway/) in front of an orchestrator."""

from __future__ import annotations

import logging

from ...services.common.config import add_arguments
from ...services.gateway.config import GatewayConfig


def add_parser(sub) -> None:
    gw = sub.add_parser("gateway", help="run the OpenAI-compatible HTTP API in front of an orchestrator")
    add_arguments(gw, GatewayConfig)
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
