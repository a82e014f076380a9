"""``coolfusion worker``: one model worker (sessions with KV caches, paper M1-M4 and T1)."""

from __future__ import annotations

import asyncio
import json
import logging
import os

from ..launcher import add_backend_arg
from .common import add_service_args

LOADING_PREFIX = "COOLFUSION_LOADING "  # stdout: a worker bound its port and loads its model (health NOT_SERVING)


def add_parser(sub) -> None:
    w = sub.add_parser("worker", help="run one model worker")
    env_model, env_tok = os.environ.get("COOLFUSION_MODEL"), os.environ.get("COOLFUSION_TOKENIZER")
    w.add_argument(
        "--model", required=not env_model, default=env_model, help="bundled name or NAME=SOURCE ($COOLFUSION_MODEL)"
    )
    w.add_argument(
        "--tokenizer-service",
        required=not env_tok,
        default=env_tok,
        help="HOST:PORT of the tokenizer service ($COOLFUSION_TOKENIZER)",
    )
    add_service_args(w, port=50052, grace=10.0)
    w.add_argument("--device", default=os.environ.get("COOLFUSION_DEVICE") or None)
    add_backend_arg(w, default=os.environ.get("COOLFUSION_BACKEND") or "auto")
    w.add_argument(
        "--kv-cells",
        type=int,
        default=int(os.environ.get("COOLFUSION_KV_CELLS") or 0),
        help="llama.cpp: KV cells (tokens) shared by all sessions of the worker (0: 16384; $COOLFUSION_KV_CELLS)",
    )
    _add_compute_args(w)
    _add_session_limits(w)
    w.set_defaults(func=run)


def _add_compute_args(w) -> None:
    w.add_argument(
        "--max-batch",
        type=int,
        default=int(os.environ.get("COOLFUSION_MAX_BATCH", 8)),
        help="decode steps of up to this many concurrently generating sessions run as one forward (1: off)",
    )
    w.add_argument(
        "--fill-ahead",
        type=int,
        default=int(os.environ.get("COOLFUSION_FILL_AHEAD", 4)),
        help="batches of decode steps also grow idle sessions' greedy continuations, up to N tokens ahead (0: off)",
    )
    w.add_argument(
        "--pack-weights",
        choices=["all", "head", "none"],
        default=os.environ.get("COOLFUSION_PACK_WEIGHTS", "all"),
        help="CPU: linear weights that get a oneDNN-packed copy for multi-row forwards "
        "(more memory, faster verify/score/batched steps)",
    )
    w.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("COOLFUSION_THREADS", 0)),
        help="torch threads (0: torch default)",
    )


def _add_session_limits(w) -> None:
    w.add_argument(
        "--session-ttl",
        type=float,
        default=float(os.environ.get("COOLFUSION_SESSION_TTL", 600)),
        help="seconds a session may stay idle before it is freed (0: never; $COOLFUSION_SESSION_TTL)",
    )
    w.add_argument(
        "--max-sessions",
        type=int,
        default=int(os.environ.get("COOLFUSION_MAX_SESSIONS", 256)),
        help="live sessions; beyond, the least recently used idle one is evicted (0: no cap; $COOLFUSION_MAX_SESSIONS)",
    )
    w.add_argument(
        "--kv-budget-mb",
        type=float,
        default=float(os.environ.get("COOLFUSION_KV_BUDGET_MB", 0)),
        help="MiB of KV cache over all sessions; beyond, LRU idle sessions are evicted (0: none; $COOLFUSION_KV_BUDGET_MB)",
    )
    w.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=float(os.environ["COOLFUSION_PREFIX_CACHE_MB"])
        if os.environ.get("COOLFUSION_PREFIX_CACHE_MB")
        else None,
        help="MiB of KV kept from recently prefilled contexts, so an Open that starts alike prefills only "
        "the rest (0: off; default 256; $COOLFUSION_PREFIX_CACHE_MB)",
    )


def run(args) -> int:
    import torch

    from ...services.worker.memory import limit_arenas

    if args.threads:
        torch.set_num_threads(args.threads)
    limit_arenas()  # before the server's threads exist: arenas are created on first use
    asyncio.run(serve_worker(args))
    return 0


async def serve_worker(args) -> None:
    """Bind first and report NOT_SERVING while the model loads, then SERVING (and the ready line)."""
    from ...services.common.metrics import start_metrics_server
    from ...services.common.server import host_port
    from ...services.worker.server import build_loading_service, load_core
    from ..launcher import announce_ready

    start_metrics_server(args.metrics_port)
    service, servicer = build_loading_service(args.model, host_port(args.host, args.port))
    port = await service.start(serving=False)
    print(f"{LOADING_PREFIX}{json.dumps({'service': 'worker', 'port': port})}", flush=True)
    limits = dict(
        session_ttl=args.session_ttl,
        max_sessions=args.max_sessions,
        kv_budget_bytes=int(args.kv_budget_mb * 2**20),
        max_batch=args.max_batch,
        pack_weights=args.pack_weights,
        fill_ahead=args.fill_ahead,
        backend=args.backend,
        kv_cells=args.kv_cells,
    )
    if args.prefix_cache_mb is not None:
        limits["prefix_cache_bytes"] = int(args.prefix_cache_mb * 2**20)
    core = await asyncio.to_thread(load_core, args.model, args.tokenizer_service, args.device, **limits)
    servicer.set_core(core)
    await service.set_serving()
    announce_ready("worker", port)
    logging.getLogger("coolfusion").info("worker serving on port %d", port)
    await service.serve_until_signal(args.grace)
