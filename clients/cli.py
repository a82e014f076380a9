"""The ``coolfusion`` command.

    coolfusion generate "PROMPT" [--mode cool] [--models smollm2,gemma3] [--json] [--connect HOST:PORT]
    coolfusion serve [--models ...] [--port 50051]       all services, stays up
    coolfusion tokenizer --models ... [--port N]          one service each: what containers run
    coolfusion worker --model NAME[=SOURCE] --tokenizer-service ADDR [--port N]
    coolfusion orchestrator --worker NAME=ADDR ... [--port N]
    coolfusion gateway --connect ORCHESTRATOR [--port 8000]   OpenAI-compatible HTTP API
    coolfusion healthcheck ADDR [--service NAME]
    coolfusion drain ADDR [--min-wait S] [--timeout S]   worker preStop hook (Kubernetes)

Service flags fall back to env vars (containers): COOLFUSION_HOST/PORT, tokenizer
COOLFUSION_MODELS, worker COOLFUSION_MODEL/TOKENIZER/DEVICE/THREADS/SESSION_TTL/MAX_SESSIONS/KV_BUDGET_MB, orchestrator
COOLFUSION_WORKERS="a=host:port,b=dns:///svc:50052", gateway COOLFUSION_ORCHESTRATOR (and
COOLFUSION_HOST/PORT, COOLFUSION_REQUEST_TIMEOUT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
import threading
import time

from ..services.sources import DEFAULT_MODELS


def default_models() -> str:
    return ",".join(DEFAULT_MODELS)


def _models_arg(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _setup_logging(level: str, fmt: str = "text") -> None:
    from ..services.common.logs import setup_logging

    setup_logging(level, fmt)


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- service entry points --------------------------------------------------------------------
async def _serve(make_service, name: str, grace: float, metrics_port: int = 0) -> None:
    """Build the service inside the running loop (grpc.aio servers bind to the loop they are made in)."""
    from ..services.common.metrics import start_metrics_server
    from .launcher import announce_ready

    start_metrics_server(metrics_port)
    service = make_service()
    port = await service.start()
    announce_ready(name, port)
    logging.getLogger("coolfusion").info("%s serving on port %d", name, port)
    await service.serve_until_signal(grace)


def cmd_tokenizer(args) -> int:
    from ..services.tokenizer.loading import load_registry
    from ..services.tokenizer.server import build_service

    registry = load_registry(args.models)
    asyncio.run(
        _serve(lambda: build_service(registry, _bind(args.host, args.port)), "tokenizer", args.grace, args.metrics_port)
    )
    return 0


LOADING_PREFIX = "COOLFUSION_LOADING "  # stdout: a worker bound its port and loads its model (health NOT_SERVING)


def cmd_worker(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    asyncio.run(_serve_worker(args))
    return 0


async def _serve_worker(args) -> None:
    """Bind first and report NOT_SERVING while the model loads, then SERVING (and the ready line)."""
    from ..services.common.metrics import start_metrics_server
    from ..services.worker.server import build_loading_service, load_core
    from .launcher import announce_ready

    start_metrics_server(args.metrics_port)
    service, servicer = build_loading_service(args.model, _bind(args.host, args.port))
    port = await service.start(serving=False)
    print(f"{LOADING_PREFIX}{json.dumps({'service': 'worker', 'port': port})}", flush=True)
    limits = dict(
        session_ttl=args.session_ttl,
        max_sessions=args.max_sessions,
        kv_budget_bytes=int(args.kv_budget_mb * 2**20),
        max_batch=args.max_batch,
        pack_weights=args.pack_weights,
        fill_ahead=args.fill_ahead,
    )
    core = await asyncio.to_thread(load_core, args.model, args.tokenizer_service, args.device, **limits)
    servicer.set_core(core)
    await service.set_serving()
    announce_ready("worker", port)
    logging.getLogger("coolfusion").info("worker serving on port %d", port)
    await service.serve_until_signal(args.grace)


def cmd_orchestrator(args) -> int:
    from ..orchestrator.server import build_service
    from ..orchestrator.workers import parse_worker_target

    workers = {}
    items = args.worker or _models_arg(os.environ.get("COOLFUSION_WORKERS", ""))
    if not items:
        raise SystemExit("give --worker NAME=HOST:PORT (repeatable) or COOLFUSION_WORKERS=NAME=HOST:PORT,...")
    for item in items:
        name, sep, address = item.partition("=")
        if not sep or not name or not address:
            raise SystemExit(f"--worker takes NAME=HOST:PORT, NAME=ADDR1|ADDR2 or NAME=dns:///HOST:PORT, got {item!r}")
        try:
            parse_worker_target(address)
        except ValueError as exc:
            raise SystemExit(f"--worker {item!r}: {exc}") from None
        workers[name] = address
    address = _bind(args.host, args.port)

    def make():
        from ..services.common.security import tokens_from_env

        tokens = args.auth_token or tokens_from_env()
        return build_service(
            workers,
            address,
            max_concurrent=args.max_concurrent,
            max_queue=args.max_queue,
            auth_tokens=tokens,
            score_rule=rule,
        )[0]

    rule = rule_from_args(args) or default_rule()

    asyncio.run(_serve(make, "orchestrator", args.grace, args.metrics_port))
    return 0


def cmd_drain(args) -> int:
    """Kubernetes preStop hook of a worker: wait at least --min-wait seconds (orchestrators
    re-resolve the headless Service and stop opening sessions here), then until the worker has
    no live session or --timeout passes; the SIGTERM that follows stops the server."""
    import grpc

    from coolfusion.protos import worker_pb2, worker_pb2_grpc

    from ..services.common.security import sync_channel
    from ..services.common.server import CHANNEL_OPTIONS

    started = time.monotonic()
    with sync_channel(args.address, CHANNEL_OPTIONS) as channel:  # TLS from COOLFUSION_TLS_* as every client
        stub = worker_pb2_grpc.ModelWorkerStub(channel)
        while True:
            elapsed = time.monotonic() - started
            try:
                live = stub.Info(worker_pb2.InfoRequest(), timeout=5.0).live_sessions
            except grpc.RpcError as exc:
                print(f"drain: worker unreachable ({exc.code().name}); done", file=sys.stderr)
                return 0
            if elapsed >= args.min_wait and live == 0:
                print(f"drain: no live sessions after {elapsed:.0f} s", file=sys.stderr)
                return 0
            if elapsed >= args.timeout:
                print(f"drain: {live} sessions still live after {elapsed:.0f} s; giving up", file=sys.stderr)
                return 0
            time.sleep(1.0)


def _http_healthcheck(address: str, timeout: float) -> int:
    """The gateway's readiness: GET http://ADDR/health answers 200 (stdlib only)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{address}/health", timeout=timeout) as reply:
            print(json.loads(reply.read()).get("status", reply.status))
            return 0
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: HTTP {exc.code}", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
    return 1


def cmd_healthcheck(args) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from ..services.common.security import sync_channel
    from ..services.common.server import CHANNEL_OPTIONS

    if args.http:
        return _http_healthcheck(args.address, args.timeout)
    with sync_channel(args.address, CHANNEL_OPTIONS) as channel:  # TLS from COOLFUSION_TLS_* as every client
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


# ---- user commands ---------------------------------------------------------------------------
def _start_cluster(
    models: list[str], device: str | None, port: int = 0, host: str = "127.0.0.1", http_port: int | None = None
):
    from rich.console import Console

    from ..services.sources import parse_specs
    from .launcher import LocalCluster

    parse_specs(models)  # a bad spec fails here, with its message, before any process starts

    console = Console(stderr=True)
    states: dict[str, str] = {}
    with console.status("starting services…") as status:

        def on_event(name: str, state: str) -> None:
            states[name] = state
            status.update("  ".join(f"{n}: {s}" for n, s in states.items()))
            if state == "ready":
                console.log(f"{name} ready")

        cluster = LocalCluster(
            models, device=device, on_event=on_event, orchestrator_port=port, host=host, http_port=http_port
        )
        cluster.start()
    return cluster


def _segment_json(segment) -> dict:
    return {
        "text": segment.text,
        "model": segment.model,
        "eos": segment.eos,
        "candidates": [
            {
                "model": c.model,
                "text": c.text,
                "eos": c.eos,
                "finish": c.finish,
                "mean_ppl": c.mean_ppl if math.isfinite(c.mean_ppl) else None,
                "ppl": {p.scorer: (p.ppl if math.isfinite(p.ppl) else None) for p in c.ppl},
            }
            for c in segment.candidates
        ],
    }


async def _generate(address: str, args) -> int:
    import grpc

    from .client import FusionClient

    options = dict(
        # Embedded services run exactly --models; a remote orchestrator gets the subset when given.
        models=_models_arg(args.models) if args.models and args.connect else [],
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        stop=args.stop or [],
        max_segment_tokens=args.max_segment_tokens,
        score_rule=rule_from_args(args),
    )
    messages = json.loads(args.messages) if args.messages else None
    prompt = None if messages else args.prompt
    segments, final = [], None
    async with FusionClient(address) as client:
        try:
            async for item in client.stream_raw(prompt, messages, **options):
                if item.HasField("segment"):
                    segments.append(item.segment)
                    if not args.json:
                        sys.stdout.write(item.segment.text)
                        sys.stdout.flush()
                else:
                    final = item.final
        except grpc.RpcError as exc:
            if not args.json:
                sys.stdout.write("\n")
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
    if args.json:
        print(
            json.dumps(
                {
                    "text": final.text,
                    "finish_reason": final.finish_reason,
                    "mode": final.mode,
                    "segments": [_segment_json(s) for s in segments],
                    "usage": {
                        u.model: {
                            "prompt_tokens": u.prompt_tokens,
                            "generated_tokens": u.generated_tokens,
                            "output_tokens": u.output_tokens,
                            "scored_tokens": u.scored_tokens,
                        }
                        for u in final.usage
                    },
                    "timings": {
                        k: getattr(final.timings, k)
                        for k in ("total_s", "first_segment_s", "open_s", "generate_s", "score_s", "commit_s")
                    },
                },
                ensure_ascii=False,
                indent=2,
            )
        )
    else:
        print(
            f"\n[{final.finish_reason}; {final.segments} segments; {final.timings.total_s:.1f} s]",
            file=sys.stderr,
        )
    return 0


def cmd_generate(args) -> int:
    from .launcher import StartError

    if not args.prompt and not args.messages:
        print("error: give a PROMPT or --messages", file=sys.stderr)
        return 2
    if args.connect:
        return asyncio.run(_generate(args.connect, args))
    try:
        cluster = _start_cluster(_models_arg(args.models or default_models()), args.device)
    except StartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_generate(cluster.address, args))
    except KeyboardInterrupt:
        return 130
    finally:
        cluster.stop()


def cmd_serve(args) -> int:
    from .launcher import StartError

    try:
        cluster = _start_cluster(_models_arg(args.models), args.device, args.port, args.host, args.http_port)
    except StartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"coolfusion serving on {cluster.address} (logs in {cluster.run_dir}); Ctrl-C stops", file=sys.stderr)
    if cluster.http_address:
        print(f"OpenAI-compatible API on http://{cluster.http_address}/v1", file=sys.stderr)
    stop = {"now": False}

    def handler(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    try:
        while not stop["now"] and all(p.proc.poll() is None for p in cluster.processes):
            time.sleep(0.5)
    finally:
        cluster.stop()
    return 0


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
    from ..orchestrator.rules import RuleError, ScoreRule

    if not (args.score_rule or args.rule_weights or args.rule_primary or args.rule_threshold is not None):
        return None
    try:
        return ScoreRule.parse(args.score_rule, args.rule_weights, args.rule_primary, args.rule_threshold)
    except RuleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def default_rule():
    """The engine's rule: $COOLFUSION_SCORE_RULE (a name or a rule JSON file), else the shipped default."""
    from ..orchestrator.rules import RuleError, ScoreRule
    from ..orchestrator.rules import default_rule as shipped

    spec = os.environ.get("COOLFUSION_SCORE_RULE", "")
    try:
        return ScoreRule.parse(spec) if spec else shipped()
    except RuleError as exc:
        print(f"error: COOLFUSION_SCORE_RULE: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# ---- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coolfusion", description="Fuse LLMs with different tokenizers, without training."
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("COOLFUSION_LOG_LEVEL"),
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="default: INFO for services, WARNING for the other commands ($COOLFUSION_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("COOLFUSION_LOG_FORMAT", "text"),
        help="json: one JSON object per line, with request_id on request logs",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = default_models()

    g = sub.add_parser("generate", help="fused generation (starts local services unless --connect)")
    g.add_argument("prompt", nargs="?", default="")
    g.add_argument("--messages", help='chat messages as JSON: [{"role": "user", "content": "..."}]')
    g.add_argument("--mode", default="cool", help="cool | cool-noalign | rerank | cool-rerank | single:<model>")
    g.add_argument("--models", help=f"comma-separated: bundled names or NAME=SOURCE (default {defaults})")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--max-segment-tokens", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--connect", help="HOST:PORT of a running orchestrator")
    g.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    add_rule_args(g)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="start all services and stay up")
    s.add_argument("--models", default=defaults)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--device")
    s.add_argument("--http-port", type=int, default=None, help="also serve the OpenAI-compatible API on this port")
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("tokenizer", help="run the tokenizer service")
    t.add_argument("--models", default=os.environ.get("COOLFUSION_MODELS") or defaults)
    t.add_argument("--host", default=os.environ.get("COOLFUSION_HOST", "127.0.0.1"))
    t.add_argument("--port", type=int, default=int(os.environ.get("COOLFUSION_PORT", 50050)))
    t.add_argument("--grace", type=float, default=5.0)
    t.set_defaults(func=cmd_tokenizer)

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
    w.add_argument("--host", default=os.environ.get("COOLFUSION_HOST", "127.0.0.1"))
    w.add_argument("--port", type=int, default=int(os.environ.get("COOLFUSION_PORT", 50052)))
    w.add_argument("--device", default=os.environ.get("COOLFUSION_DEVICE") or None)
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
        help="CPU: linear weights that get a oneDNN-packed copy for multi-row forwards (more memory, faster verify/score/batched steps)",
    )
    w.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("COOLFUSION_THREADS", 0)),
        help="torch threads (0: torch default)",
    )
    w.add_argument("--grace", type=float, default=10.0)
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
    w.set_defaults(func=cmd_worker)

    o = sub.add_parser("orchestrator", help="run the public Fusion service")
    o.add_argument(
        "--worker",
        action="append",
        help="NAME=HOST:PORT | NAME=ADDR1|ADDR2 (replicas) | NAME=dns:///HOST:PORT (headless Service), "
        "in tie-break order (default: $COOLFUSION_WORKERS, comma-separated)",
    )
    o.add_argument("--host", default=os.environ.get("COOLFUSION_HOST", "127.0.0.1"))
    o.add_argument("--port", type=int, default=int(os.environ.get("COOLFUSION_PORT", 50051)))
    o.add_argument(
        "--auth-token", action="append", help="bearer token callers must send (repeatable; env COOLFUSION_AUTH_TOKENS)"
    )
    o.add_argument("--max-concurrent", type=int, default=16, help="generations running at once")
    o.add_argument("--max-queue", type=int, default=64, help="generations waiting; beyond: RESOURCE_EXHAUSTED")
    o.add_argument("--grace", type=float, default=30.0)
    add_rule_args(o)
    o.set_defaults(func=cmd_orchestrator)

    from ..services.gateway.command import add_gateway_parser

    add_gateway_parser(sub)

    for service_parser in (t, w, o):
        service_parser.add_argument(
            "--metrics-port",
            type=int,
            default=int(os.environ.get("COOLFUSION_METRICS_PORT", 0)),
            help="serve Prometheus /metrics on this HTTP port (0: off)",
        )

    from .evaluation.command import add_eval_parser

    add_eval_parser(sub, defaults)

    d = sub.add_parser("drain", help="preStop hook: wait until the worker at ADDR has no live session")
    d.add_argument("address")
    d.add_argument("--min-wait", type=float, default=15.0, help="seconds to wait in any case (DNS re-resolution)")
    d.add_argument("--timeout", type=float, default=300.0)
    d.set_defaults(func=cmd_drain)

    h = sub.add_parser("healthcheck", help="exit 0 when the service at ADDR is SERVING")
    h.add_argument("address")
    h.add_argument("--service", default="")
    h.add_argument("--timeout", type=float, default=5.0)
    h.add_argument("--http", action="store_true", help="ADDR is the HTTP gateway: GET /health answers 200")
    h.set_defaults(func=cmd_healthcheck)

    from .bench import add_bench_parser

    add_bench_parser(sub)
    return parser


def log_level(args) -> str:
    """--log-level (or $COOLFUSION_LOG_LEVEL) when given; else INFO for services, WARNING otherwise."""
    services = ("tokenizer", "worker", "orchestrator", "gateway", "drain")
    return args.log_level or ("INFO" if args.command in services else "WARNING")


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    from ..services.sources import UnknownModelError

    args = build_parser().parse_args(argv)
    _setup_logging(log_level(args), args.log_format)
    if args.command in ("generate", "eval", "bench") and threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so the services these commands started are stopped too
        # (the launcher starts them in their own process groups, where no signal follows ours).
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return args.func(args)
    except UnknownModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
