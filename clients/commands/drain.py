"""``coolfusion drain``: a worker's Kubernetes preStop hook."""

from __future__ import annotations

import sys
import time


def add_parser(sub) -> None:
    d = sub.add_parser("drain", help="preStop hook: wait until the worker at ADDR has no live session")
    d.add_argument("address")
    d.add_argument("--min-wait", type=float, default=15.0, help="seconds to wait in any case (DNS re-resolution)")
    d.add_argument("--timeout", type=float, default=300.0)
    d.set_defaults(func=run)


def run(args) -> int:
    """Wait at least --min-wait seconds (orchestrators re-resolve the headless Service and stop
    opening sessions here), then until the worker has no live session or --timeout passes; the
    SIGTERM that follows stops the server."""
    import grpc

    from coolfusion.protos import worker_pb2, worker_pb2_grpc

    from ...services.common.security import internal_token, sync_channel
    from ...services.common.server import CHANNEL_OPTIONS

    started = time.monotonic()
    # TLS from COOLFUSION_TLS_* as every client; Info is internal: $COOLFUSION_INTERNAL_TOKEN.
    with sync_channel(args.address, CHANNEL_OPTIONS, token=internal_token()) as channel:
        stub = worker_pb2_grpc.ModelWorkerStub(channel)
        while True:
            elapsed = time.monotonic() - started
            try:
                live = stub.Info(worker_pb2.InfoRequest(), timeout=5.0).live_sessions
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:  # a misconfiguration, not a gone worker
                    print(f"drain: {exc.details()}; set the worker's COOLFUSION_INTERNAL_TOKEN", file=sys.stderr)
                    return 1
                print(f"drain: worker unreachable ({exc.code().name}); done", file=sys.stderr)
                return 0
            if elapsed >= args.min_wait and live == 0:
                print(f"drain: no live sessions after {elapsed:.0f} s", file=sys.stderr)
                return 0
            if elapsed >= args.timeout:
                print(f"drain: {live} sessions still live after {elapsed:.0f} s; giving up", file=sys.stderr)
                return 0
            time.sleep(1.0)
