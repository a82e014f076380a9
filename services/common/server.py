"""Shared gRPC server plumbing: interceptor, health, reflection, message limits, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .interceptor import ExceptionToStatusInterceptor
from .security import INTERNAL_TOKEN_ENV, BearerTokenInterceptor, ServerTls

log = logging.getLogger(__name__)


def host_port(host: str, port: int | str) -> str:
    """``HOST:PORT``, with an IPv6 host in brackets (``[::1]:50051``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # A restarted worker is reached again within seconds, not after grpc's 2-minute max backoff.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 3_000),
]
SERVER_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


class GrpcService:
    """One grpc.aio server with health and reflection; ``start()`` returns the bound port."""

    def __init__(
        self,
        register: Callable[[grpc.aio.Server], None],
        service_names: Iterable[str],
        address: str = "127.0.0.1:0",
        tls: ServerTls | None = None,
        auth_tokens: list[str] | None = None,
        internal_tokens: list[str] | None = None,
    ):
        """``tls`` defaults to the COOLFUSION_TLS_* environment; ``auth_tokens`` (bearer tokens of
        public callers) or ``internal_tokens`` (an internal service's: docs/security.md) are
        checked before anything else when given; health and reflection stay open."""
        if auth_tokens and internal_tokens:
            raise ValueError("a service takes public bearer tokens or internal tokens, not both")
        self.address = address
        self.tls = tls if tls is not None else ServerTls.from_env()
        interceptors: list[grpc.aio.ServerInterceptor] = [ExceptionToStatusInterceptor()]
        if auth_tokens:
            interceptors.insert(0, BearerTokenInterceptor(auth_tokens))
        elif internal_tokens:
            interceptors.insert(0, BearerTokenInterceptor(internal_tokens, f"internal token (${INTERNAL_TOKEN_ENV})"))
        self.server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
        register(self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = list(service_names)
        reflection.enable_server_reflection(
            [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        self.port: int | None = None
        self.on_stop: list[Callable[[], Awaitable[None]]] = []  # awaited after the server stopped

    async def start(self, serving: bool = True) -> int:
        """Bind and serve; ``serving=False``: health reports NOT_SERVING until ``set_serving()``
        (a worker loading its model)."""
        if self.tls is not None:
            self.port = self.server.add_secure_port(self.address, self.tls.credentials())
        else:
            self.port = self.server.add_insecure_port(self.address)
        if not self.port:
            raise OSError(f"could not bind {self.address}")
        await self.server.start()
        await self.set_serving(serving)
        return self.port

    async def set_serving(self, serving: bool = True) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, stop accepting, let in-flight calls finish for ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for hook in self.on_stop:
            await hook()

    async def serve_until_signal(self, grace: float = 10.0) -> None:
        """Run until SIGTERM/SIGINT, then stop gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        waiter = asyncio.create_task(self.server.wait_for_termination())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            log.info("signal received: draining for up to %.0f s", grace)
            await self.stop(grace)
        waiter.cancel()
        stopper.cancel()
