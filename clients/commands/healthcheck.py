"""``coolfusion healthcheck``: exit 0 when a service reports SERVING (compose and probe use)."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    h = sub.add_parser("healthcheck", help="exit 0 when the service at ADDR is SERVING")
    h.add_argument("address")
    h.add_argument("--service", default="")
    h.add_argument("--timeout", type=float, default=5.0)
    h.set_defaults(func=run)


def run(args) -> int:
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
