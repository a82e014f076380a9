"""Run the gateway with uvicorn: as the ``coolfusion gateway`` process, or in a thread (tests,
benchmarks) on a free loopback port."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from collections.abc import Callable

import uvicorn

from .app import create_app


class _Server(uvicorn.Server):
    """A uvicorn server that reports once it listens (the port is known then, even for port 0)."""

    def __init__(self, config: uvicorn.Config, on_listening: Callable[[int], None]):
        super().__init__(config)
        self.on_listening = on_listening

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_listening(sockets[0].getsockname()[1])


def _socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: without, a response's second small write (the body, each
    # event) waits for the client's delayed ACK, ~40 ms per request on a kept-alive connection.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


def _config(app, log_level: str, grace: float = 10.0) -> uvicorn.Config:
    # The gateway logs its requests itself; uvicorn's access log would double every line.
    return uvicorn.Config(
        app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=max(1, round(grace))
    )


def serve(
    orchestrator: str,
    host: str,
    port: int,
    on_listening: Callable[[int], None],
    request_timeout: float | None = None,
    log_level: str = "info",
    grace: float = 30.0,
) -> None:
    """Serve until SIGINT/SIGTERM; then in-flight requests get ``grace`` seconds to finish."""
    app = create_app(orchestrator, request_timeout)
    server = _Server(_config(app, log_level.lower(), grace), on_listening)
    # uvicorn re-raises the signal that stopped it once it has drained; with these handlers in
    # place that is a no-op, so a drained gateway exits 0 as the other services do.
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: None)
    server.run(sockets=[_socket(host, port)])


class GatewayThread:
    """The gateway in a thread with its own event loop, on a free loopback port:
    ``with GatewayThread(address) as gw: gw.url``."""

    def __init__(self, orchestrator: str, request_timeout: float | None = None, host: str = "127.0.0.1"):
        self.app = create_app(orchestrator, request_timeout)
        self.listening = threading.Event()
        self.port = 0
        self.server = _Server(_config(self.app, "warning"), self._on_listening)
        self.sock = _socket(host, 0)
        self.host = host
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve([self.sock])), daemon=True)

    def _on_listening(self, port: int) -> None:
        self.port = port
        self.listening.set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> GatewayThread:
        self.thread.start()
        if not self.listening.wait(timeout):
            raise RuntimeError(f"gateway not listening after {timeout:.0f} s")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self) -> GatewayThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # From async code: start and stop off the loop, which may be serving what the gateway calls.
    async def __aenter__(self) -> GatewayThread:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.stop)
