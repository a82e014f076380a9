"""Every ``COOLFUSION_*`` environment variable the package reads, and the one place it reads them.

``VARIABLES`` names each with what it sets; ``read`` refuses a name missing there, so a new
variable is declared before it is used. The service options (``services/*/config.py``) name their
variables in their configs and read them through here too. Install- and compose-time variables
(``scripts/install.sh``, ``docker-compose.yml``) are not the package's and are not listed.
"""

from __future__ import annotations

import os
from typing import overload

VARIABLES: dict[str, str] = {
    # every service (services/common/config.py)
    "COOLFUSION_HOST": "address a service listens on",
    "COOLFUSION_PORT": "port a service listens on",
    "COOLFUSION_METRICS_PORT": "Prometheus /metrics port of a gRPC service (0: off)",
    "COOLFUSION_LOG_LEVEL": "log level of the coolfusion command",
    "COOLFUSION_LOG_FORMAT": "text or json log lines",
    # tokenizer service
    "COOLFUSION_MODELS": "the tokenizer service's models",
    # worker service (services/worker/config.py)
    "COOLFUSION_MODEL": "the worker's model",
    "COOLFUSION_TOKENIZER": "HOST:PORT of the tokenizer service (worker, orchestrator)",
    "COOLFUSION_DEVICE": "the worker's device",
    "COOLFUSION_BACKEND": "the worker's backend: auto, transformers or llamacpp",
    "COOLFUSION_KV_CELLS": "llama.cpp KV cells of a worker",
    "COOLFUSION_MAX_BATCH": "decode steps batched into one forward",
    "COOLFUSION_FILL_AHEAD": "tokens idle sessions grow in a batch",
    "COOLFUSION_PACK_WEIGHTS": "linear weights with a oneDNN-packed copy: all, head or none",
    "COOLFUSION_THREADS": "torch threads of a worker",
    "COOLFUSION_SESSION_TTL": "seconds a session may stay idle",
    "COOLFUSION_MAX_SESSIONS": "live sessions of a worker",
    "COOLFUSION_KV_BUDGET_MB": "MiB of KV cache over a worker's sessions",
    "COOLFUSION_PREFIX_CACHE_MB": "MiB of KV kept of prefilled contexts",
    # orchestrator service
    "COOLFUSION_WORKERS": "NAME=ADDRESS,... of the orchestrator's workers",
    "COOLFUSION_SCORE_RULE": "the orchestrator's scoring rule: a name or a rule JSON file",
    # gateway
    "COOLFUSION_ORCHESTRATOR": "HOST:PORT of the orchestrator behind the gateway",
    "COOLFUSION_REQUEST_TIMEOUT": "the gateway's deadline per gRPC call",
    # security (docs/security.md)
    "COOLFUSION_AUTH_TOKENS": "bearer tokens the orchestrator accepts, comma-separated",
    "COOLFUSION_AUTH_TOKEN": "bearer token a client sends",
    "COOLFUSION_INTERNAL_TOKEN": "token between the orchestrator, workers and the tokenizer service",
    "COOLFUSION_TLS_CERT": "a server's TLS certificate",
    "COOLFUSION_TLS_KEY": "a server's TLS key",
    "COOLFUSION_TLS_CLIENT_CA": "CA a server checks client certificates against",
    "COOLFUSION_TLS_CA": "CA a client checks the server against",
    "COOLFUSION_TLS_CLIENT_CERT": "a client's TLS certificate",
    "COOLFUSION_TLS_CLIENT_KEY": "a client's TLS key",
    # files
    "COOLFUSION_CACHE": "folder of converted models (default ~/.cache/coolfusion)",
    "COOLFUSION_DATA_DIR": "folder of the eval and distill task files (default: the packaged copy)",
}


@overload
def read(name: str, default: str) -> str: ...
@overload
def read(name: str, default: None = None) -> str | None: ...
def read(name: str, default: str | None = None) -> str | None:
    """``$name``, or ``default`` when it is unset or empty."""
    if name not in VARIABLES:
        raise KeyError(f"{name} is not declared in coolfusion/envs.py")
    return os.environ.get(name) or default
