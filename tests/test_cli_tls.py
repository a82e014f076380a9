"""`coolfusion healthcheck` and `coolfusion drain` (compose healthcheck, Kubernetes preStop) reach
a TLS-only service with the same COOLFUSION_TLS_* settings as every other client."""

from __future__ import annotations

import asyncio
import os
import sys

from test_security import pki  # noqa: F401  (the CA and certificates, as a fixture)

from coolfusion.protos import worker_pb2_grpc
from coolfusion.services.common.security import ServerTls
from coolfusion.services.common.server import GrpcService
from coolfusion.services.worker.server import SERVICE_NAME as WORKER_SERVICE
from coolfusion.services.worker.server import WorkerServicer


async def _cli(*args: str, env: dict) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "coolfusion.clients.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **env},
    )
    out, _ = await proc.communicate()
    return proc.returncode, out.decode()


async def test_healthcheck_and_drain_over_tls(pki, cluster):  # noqa: F811
    servicer = WorkerServicer(cluster.cores["smollm2"])
    service = GrpcService(
        lambda server: worker_pb2_grpc.add_ModelWorkerServicer_to_server(servicer, server),
        [WORKER_SERVICE],
        tls=ServerTls(str(pki / "server.pem"), str(pki / "server.key")),
    )
    address = f"127.0.0.1:{await service.start()}"
    plain = {k: "" for k in ("COOLFUSION_TLS_CA", "COOLFUSION_TLS_CLIENT_CERT", "COOLFUSION_TLS_CLIENT_KEY")}
    trusted = {**plain, "COOLFUSION_TLS_CA": str(pki / "ca.pem")}
    try:
        code, out = await _cli("healthcheck", address, "--timeout", "20", env=trusted)
        assert (code, out.strip()) == (0, "SERVING")
        code, out = await _cli("healthcheck", address, "--timeout", "5", env=plain)
        assert code == 1 and out.startswith("unhealthy: UNAVAILABLE")  # a plaintext client cannot talk to it
        code, out = await _cli("drain", address, "--min-wait", "0", "--timeout", "20", env=trusted)
        assert code == 0 and "no live sessions" in out, out
        code, out = await _cli("drain", address, "--min-wait", "0", "--timeout", "20", env=plain)
        assert code == 0 and "worker unreachable" in out, out
    finally:
        await service.stop(0)


def test_log_level_is_honoured_by_services(monkeypatch):
    from coolfusion.clients.cli import build_parser, log_level

    monkeypatch.delenv("COOLFUSION_LOG_LEVEL", raising=False)
    worker = ["orchestrator", "--worker", "a=127.0.0.1:1"]
    assert log_level(build_parser().parse_args(worker)) == "INFO"
    assert log_level(build_parser().parse_args(["--log-level", "warning", *worker])) == "WARNING"
    assert log_level(build_parser().parse_args(["healthcheck", "127.0.0.1:1"])) == "WARNING"
    monkeypatch.setenv("COOLFUSION_LOG_LEVEL", "debug")
    assert log_level(build_parser().parse_args(worker)) == "DEBUG"
