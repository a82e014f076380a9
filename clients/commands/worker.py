"""``coolfusion worker``: one model worker (sessions with KV caches, paper M1-M4 and T1)."""

from __future__ import annotations

import asyncio
import json
import logging

from ... import envs
from ...services.common.config import add_arguments, from_args
from ...services.worker.config import MIB, WorkerConfig

LOADING_PREFIX = "COOLFUSION_LOADING "  # stdout: a worker bound its port and loads its model (health NOT_SERVING)


def add_parser(sub) -> None:
    w = sub.add_parser("worker", help="run one model worker")
    env_model, env_tok = envs.read("COOLFUSION_MODEL"), envs.read("COOLFUSION_TOKENIZER")
    w.add_argument(
        "--model", required=not env_model, default=env_model, help="bundled name or NAME=SOURCE ($COOLFUSION_MODEL)"
    )
    w.add_argument(
        "--tokenizer-service",
        required=not env_tok,
        default=env_tok,
        help="HOST:PORT of the tokenizer service ($COOLFUSION_TOKENIZER)",
    )
    add_arguments(w, WorkerConfig)
    w.set_defaults(func=run)


def run(args) -> int:
    from ...services.sources import parse_spec
    from ...services.worker.llamacpp import resolve_backend
    from ...services.worker.memory import limit_arenas

    c = from_args(WorkerConfig, args)
    # Before anything starts: a backend this image cannot run (transformers without torch) is one
    # line and exit status 2 (``cli.main``), not a worker that reports loading and then dies.
    backend = resolve_backend(c.backend, parse_spec(args.model), c.device)
    if backend == "transformers" and c.threads:
        import torch  # its forwards run on torch's threads; llama.cpp's context gets ``threads``

        torch.set_num_threads(c.threads)
    limit_arenas()  # before the server's threads exist: arenas are created on first use
    asyncio.run(serve_worker(args, backend))
    return 0


async def serve_worker(args, backend: str) -> None:
    """Bind first and report NOT_SERVING while the model loads, then SERVING (and the ready line)."""
    from ...services.common.metrics import start_metrics_server
    from ...services.common.server import host_port
    from ...services.worker.server import build_loading_service, load_core
    from ..launcher import announce_ready

    start_metrics_server(args.metrics_port)
    service, servicer = build_loading_service(args.model, host_port(args.host, args.port))
    port = await service.start(serving=False)
    print(f"{LOADING_PREFIX}{json.dumps({'service': 'worker', 'port': port})}", flush=True)
    c = from_args(WorkerConfig, args)
    limits = dict(
        session_ttl=c.session_ttl,
        max_sessions=c.max_sessions,
        kv_budget_bytes=int(c.kv_budget_mb * MIB),
        max_batch=c.max_batch,
        pack_weights=c.pack_weights,
        fill_ahead=c.fill_ahead,
        backend=backend,
        kv_cells=c.kv_cells,
        threads=c.threads,
        prefix_cache_bytes=int(c.prefix_cache_mb * MIB),
    )
    core = await asyncio.to_thread(load_core, args.model, args.tokenizer_service, c.device, **limits)
    servicer.set_core(core)
    await service.set_serving()
    announce_ready("worker", port)
    logging.getLogger("coolfusion").info("worker serving on port %d", port)
    await service.serve_until_signal(args.grace)
