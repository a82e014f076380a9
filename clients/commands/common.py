"""What several subcommands share: model lists, logging, binding, serving, local clusters, rules."""

from __future__ import annotations

import argparse
import logging
import sys

from ... import envs
from ...services.common.config import comma_list
from ...services.sources import DEFAULT_MODELS


def default_models() -> str:
    return ",".join(DEFAULT_MODELS)


def models_arg(text: str) -> list[str]:
    return comma_list(text)


def setup_logging(level: str, fmt: str = "text") -> None:
    from ...services.common.logs import setup_logging as setup

    setup(level, fmt)


async def serve(make_service, name: str, grace: float, metrics_port: int = 0) -> None:
    """Build the service inside the running loop (grpc.aio servers bind to the loop they are made in)."""
    from ...services.common.metrics import start_metrics_server
    from ..launcher import announce_ready

    start_metrics_server(metrics_port)
    service = make_service()
    port = await service.start()
    announce_ready(name, port)
    logging.getLogger("coolfusion").info("%s serving on port %d", name, port)
    await service.serve_until_signal(grace)


# ---- scoring rules ---------------------------------------------------------------------------
def add_rule_args(parser: argparse.ArgumentParser, default: str = "") -> None:
    parser.add_argument(
        "--score-rule",
        default=default,
        help="how candidates are chosen: mean-ppl (paper eq. 3) | mean-nll | product | calibrated | gated, "
        "or a rule JSON file (default: the server's)",
    )
    parser.add_argument("--rule-weights", default="", help="per-model weights: m1=2,m2=1 or a JSON file")
    parser.add_argument("--rule-primary", default="", help="gated: the trusted model (default: the first)")
    parser.add_argument("--rule-threshold", type=float, default=None, help="gated: the primary's smallest posterior")


def rule_from_args(args):
    """The rule the flags describe; None when no flag names one. A bad rule exits 2."""
    from ...orchestrator.rules import RuleError, ScoreRule

    if not (args.score_rule or args.rule_weights or args.rule_primary or args.rule_threshold is not None):
        return None
    try:
        return ScoreRule.parse(args.score_rule, args.rule_weights, args.rule_primary, args.rule_threshold)
    except RuleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def default_rule():
    """The engine's rule: $COOLFUSION_SCORE_RULE (a name or a rule JSON file), else the shipped default."""
    from ...orchestrator.rules import RuleError, ScoreRule
    from ...orchestrator.rules import default_rule as shipped

    spec = envs.read("COOLFUSION_SCORE_RULE", "")
    try:
        return ScoreRule.parse(spec) if spec else shipped()
    except RuleError as exc:
        print(f"error: COOLFUSION_SCORE_RULE: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
