"""``coolfusion gateway``: the OpenAI-compatible HTTP API (services/gateway/)."""

from __future__ import annotations


def add_parser(sub) -> None:
    from ...services.gateway.command import add_gateway_parser

    add_gateway_parser(sub)
