"""The worker service's options, each with its default, environment variable and help, once:
``coolfusion worker``'s flags are made from ``WorkerConfig`` (``services/common/config.py``) and
``WorkerCore`` takes its defaults from ``WORKER``. Nothing here imports torch."""

from __future__ import annotations

from dataclasses import dataclass

from ..common.config import GrpcServiceConfig, grace, option, port

BACKENDS = ("auto", "transformers", "llamacpp")


@dataclass(frozen=True)
class WorkerConfig(GrpcServiceConfig):
    port: int = port(50052)
    grace: float = grace(10.0)
    device: str | None = option(None, "COOLFUSION_DEVICE", "cpu, cuda, ... (unset: cuda when available)")
    backend: str = option(
        "auto",
        "COOLFUSION_BACKEND",
        "what runs the model: auto (transformers on CUDA, llama.cpp for a .gguf model on the CPU when "
        "llama-cpp-python is installed, else transformers), transformers or llamacpp",
        choices=BACKENDS,
    )
    kv_cells: int = option(
        0, "COOLFUSION_KV_CELLS", "llama.cpp: KV cells (tokens) shared by all sessions of the worker (0: 16384)"
    )
    # Batching
    max_batch: int = option(
        8,
        "COOLFUSION_MAX_BATCH",
        "decode steps of up to this many concurrently generating sessions run as one forward (1: off)",
    )
    fill_ahead: int = option(
        4,
        "COOLFUSION_FILL_AHEAD",
        "batches of decode steps also grow idle sessions' greedy continuations, up to N tokens ahead (0: off)",
    )
    pack_weights: str = option(
        "all",
        "COOLFUSION_PACK_WEIGHTS",
        "CPU: linear weights that get a oneDNN-packed copy for multi-row forwards "
        "(more memory, faster verify/score/batched steps)",
        choices=("all", "head", "none"),
    )
    threads: int = option(
        0,
        "COOLFUSION_THREADS",
        "compute threads: torch's on transformers, the context's on llama.cpp "
        "(0: $OMP_NUM_THREADS, else one per physical core)",
    )
    # Session limits
    session_ttl: float = option(
        600.0, "COOLFUSION_SESSION_TTL", "seconds a session may stay idle before it is freed (0: never)"
    )
    max_sessions: int = option(
        256,
        "COOLFUSION_MAX_SESSIONS",
        "live sessions; beyond, the least recently used idle one is evicted (0: no cap)",
    )
    kv_budget_mb: float = option(
        0.0,
        "COOLFUSION_KV_BUDGET_MB",
        "MiB of KV cache over all sessions; beyond, LRU idle sessions are evicted (0: none)",
    )
    # A default that keeps a few long few-shot contexts of the bundled models (tens of MiB each).
    prefix_cache_mb: float = option(
        256.0,
        "COOLFUSION_PREFIX_CACHE_MB",
        "MiB of KV kept from recently prefilled contexts, so an Open that starts alike prefills only the rest (0: off)",
    )


WORKER = WorkerConfig()  # the defaults
MIB = 2**20
