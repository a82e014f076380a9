"""``coolfusion serve``: every service on this machine, up until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import sys
import time

from ..launcher import add_backend_arg, start_cluster
from .common import default_models, models_arg


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="start all services and stay up")
    s.add_argument("--models", default=default_models())
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--device")
    add_backend_arg(s)
    s.add_argument("--http-port", type=int, default=None, help="also serve the OpenAI-compatible API on this port")
    s.set_defaults(func=run)


def run(args) -> int:
    from ..launcher import StartError

    try:
        cluster = start_cluster(
            models_arg(args.models), args.device, args.port, args.host, args.http_port, backend=args.backend
        )
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
