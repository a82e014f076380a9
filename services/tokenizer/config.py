"""The tokenizer service's options, each with its default, environment variable and help, once
(``services/common/config.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..common.config import GrpcServiceConfig, grace, option, port
from ..sources import DEFAULT_MODELS


@dataclass(frozen=True)
class TokenizerConfig(GrpcServiceConfig):
    port: int = port(50050)
    grace: float = grace(5.0)
    models: str = option(",".join(DEFAULT_MODELS), "COOLFUSION_MODELS", "comma-separated: bundled names or NAME=SOURCE")
