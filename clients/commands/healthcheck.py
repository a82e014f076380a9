"""``coolfusion healthcheck``: exit 0 when a service reports SERVING (compose and probe use)."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    h = sub.add_parser("healthcheck", help="exit 0 when the service at ADDR is SERVING")
    h.add_argument("address")
    h.add_argument("--service", default="")
    h.add_argument("--timeout", type=float, default=5.0)
    h.add_argument("--http", action="store_true", help="ADDR is the HTTP gateway: GET /health answers 200")
    h.set_defaults(func=run)


def http_healthcheck(address: str, timeout: float) -> int:
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


def run(args) -> int:
    if args.http:
        return http_healthcheck(args.address, args.timeout)
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from ...services.common.security import sync_channel
    from ...services.common.server import CHANNEL_OPTIONS

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
