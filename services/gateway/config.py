"""The HTTP gateway's options, each with its default, environment variable and help, once
(``services/common/config.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..common.config import ServiceConfig, grace, option, port


@dataclass(frozen=True)
class GatewayConfig(ServiceConfig):
    port: int = port(8000)
    grace: float = grace(30.0)
    connect: str | None = option(
        None,
        "COOLFUSION_ORCHESTRATOR",
        "HOST:PORT of the orchestrator; TLS and token settings as every client",
    )
    request_timeout: float = option(
        600.0,
        "COOLFUSION_REQUEST_TIMEOUT",
        "deadline of each gRPC call in seconds; past it the caller gets 504 (0: none)",
    )
