"""The orchestrator service's options, each with its default, environment variable and help, once
(``services/common/config.py``); ``server.py`` takes its defaults from ``ORCHESTRATOR``."""

from __future__ import annotations

from dataclasses import dataclass

from ..services.common.config import GrpcServiceConfig, grace, option, port


@dataclass(frozen=True)
class OrchestratorConfig(GrpcServiceConfig):
    port: int = port(50051)
    grace: float = grace(30.0)
    # Admission: beyond both, a request is refused with RESOURCE_EXHAUSTED.
    max_concurrent: int = option(16, None, "generations running at once")
    max_queue: int = option(64, None, "generations waiting; beyond: RESOURCE_EXHAUSTED")
    tokenizer_service: str | None = option(
        None,
        "COOLFUSION_TOKENIZER",
        "HOST:PORT of the tokenizer service: each request's context is counted in every model's tokens and "
        "checked against its context length before any worker works (unset: only sizes in characters and "
        "messages are checked)",
    )


ORCHESTRATOR = OrchestratorConfig()  # the defaults
