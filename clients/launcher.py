"""Start the whole service tree as local processes on free loopback ports.

Used by ``coolfusion generate`` (without ``--connect``) and ``coolfusion serve``: a tokenizer
service, one worker per model, the orchestrator (and with ``http_port`` the HTTP gateway), each a ``coolfusion <service>`` process
that binds port 0 and announces its port on stdout (``COOLFUSION_READY {...}``). Service logs go
to files in a run directory; a failed start shows the tail of the failing service's log.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..services.common import security
from ..services.worker.config import BACKENDS

READY_PREFIX = "COOLFUSION_READY "


def announce_ready(service: str, port: int, **extra) -> None:
    """Called by a service process once it serves: the launcher waits for this line."""
    print(READY_PREFIX + json.dumps({"service": service, "port": port, **extra}), flush=True)


class StartError(RuntimeError):
    pass


@dataclass
class ServiceProcess:
    name: str
    proc: subprocess.Popen
    log_path: Path
    info: dict = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)

    def _pump(self) -> None:
        # stdout carries only the ready line; logs go to stderr -> log file.
        for line in self.proc.stdout:
            if line.startswith(READY_PREFIX):
                self.info = json.loads(line[len(READY_PREFIX) :])
                self.ready.set()
        self.ready.set()  # process ended: wake the waiter

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.info['port']}"

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class LocalCluster:
    """Tokenizer service + one worker per model + orchestrator, as child processes."""

    def __init__(
        self,
        models: list[str],
        run_dir: str | None = None,
        device: str | None = None,
        on_event: Callable[[str, str], None] | None = None,
        orchestrator_port: int = 0,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        backend: str | None = None,
        internal_token: str | None = None,
    ):
        """``backend``: every worker's ``--backend`` (None: theirs, "auto" unless $COOLFUSION_BACKEND).
        ``internal_token``: what the workers and the tokenizer service require (None:
        $COOLFUSION_INTERNAL_TOKEN's, or a random one, so the inside is closed by default)."""
        self.models = models
        self.internal_token = internal_token or security.internal_token() or security.new_internal_token()
        self.backend = backend
        self.run_dir = Path(run_dir or tempfile.mkdtemp(prefix="coolfusion-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.on_event = on_event or (lambda name, status: None)
        self.orchestrator_port = orchestrator_port
        self.host = host
        self.processes: list[ServiceProcess] = []
        self.address: str | None = None
        self.http_port = http_port  # None: no gateway
        self.http_address: str | None = None

    def _spawn(self, name: str, args: list[str], threads: int) -> ServiceProcess:
        log_path = self.run_dir / f"{name}.log"
        env = dict(os.environ)
        # Each process gets its share of the cores so concurrent workers do not fight over them.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if name == "gateway":  # it calls only the orchestrator: the inside's token stays inside
            env.pop(security.INTERNAL_TOKEN_ENV, None)
        else:
            env[security.INTERNAL_TOKEN_ENV] = self.internal_token
        proc = subprocess.Popen(
            [sys.executable, "-m", "coolfusion.clients.cli", *args],
            stdout=subprocess.PIPE,
            stderr=open(log_path, "w"),
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,  # Ctrl-C in the terminal reaches us, and we stop the children in order
        )
        service = ServiceProcess(name, proc, log_path)
        threading.Thread(target=service._pump, daemon=True).start()
        self.processes.append(service)
        self.on_event(name, "starting")
        return service

    def _wait(self, services: list[ServiceProcess], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for service in services:
            service.ready.wait(max(0.0, deadline - time.monotonic()))
            if not service.info:
                code = service.proc.poll()
                why = f"exited with code {code}" if code is not None else f"not ready after {timeout:.0f} s"
                raise StartError(f"{service.name} {why}; log {service.log_path}:\n{service.log_tail()}")
            self.on_event(service.name, "ready")

    def start(self, timeout: float = 600.0) -> str:
        """Start everything; returns the orchestrator's address (the gateway's: ``http_address``)."""
        try:
            cores = os.cpu_count() or 2
            threads = max(1, cores // max(1, len(self.models)))
            tok = self._spawn("tokenizer", ["tokenizer", "--models", ",".join(self.models), "--port", "0"], 1)
            self._wait([tok], timeout)
            workers = []
            for spec in self.models:
                name = spec.split("=", 1)[0]
                args = [
                    "worker",
                    "--model",
                    spec,
                    "--tokenizer-service",
                    tok.address,
                    "--port",
                    "0",
                    "--threads",
                    str(threads),
                ]
                if self.device:
                    args += ["--device", self.device]
                if self.backend:
                    args += ["--backend", self.backend]
                workers.append(self._spawn(f"worker:{name}", args, threads))
            self._wait(workers, timeout)
            worker_args = []
            for spec, w in zip(self.models, workers):
                worker_args += ["--worker", f"{spec.split('=', 1)[0]}={w.address}"]
            orch = self._spawn(
                "orchestrator",
                [
                    "orchestrator",
                    *worker_args,
                    "--tokenizer-service",
                    tok.address,
                    "--host",
                    self.host,
                    "--port",
                    str(self.orchestrator_port),
                ],
                1,
            )
            self._wait([orch], timeout)
            from ..services.common.server import host_port  # grpc: not at the CLI's import

            self.address = host_port(self.host, orch.info["port"])
            if self.http_port is not None:
                gateway = self._spawn(
                    "gateway",
                    ["gateway", "--connect", self.address, "--host", self.host, "--port", str(self.http_port)],
                    1,
                )
                self._wait([gateway], timeout)
                self.http_address = host_port(self.host, gateway.info["port"])
            return self.address
        except BaseException:
            self.stop()
            raise

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM in reverse start order, then SIGKILL whatever is left after ``grace``."""
        for service in reversed(self.processes):
            if service.proc.poll() is None:
                try:
                    os.killpg(service.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for service in self.processes:
            try:
                service.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(service.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                service.proc.wait()
        self.processes.clear()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def add_backend_arg(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--backend`` of the workers (``services/worker/llamacpp.py``, ``resolve_backend``)."""
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=default,
        help="what runs each model: auto (transformers on CUDA, llama.cpp for .gguf models on the CPU "
        "when llama-cpp-python is installed, else transformers), transformers or llamacpp "
        "(default: $COOLFUSION_BACKEND, else auto)",
    )


def start_cluster(
    models: list[str],
    device: str | None,
    port: int = 0,
    host: str = "127.0.0.1",
    http_port: int | None = None,
    backend: str | None = None,
):
    """Start the services for ``models`` on this machine, with a live status line on stderr."""
    from rich.console import Console

    from ..services.sources import parse_specs

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
            models,
            device=device,
            on_event=on_event,
            orchestrator_port=port,
            host=host,
            http_port=http_port,
            backend=backend,
        )
        cluster.start()
    return cluster
