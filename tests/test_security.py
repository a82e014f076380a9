"""TLS, mutual TLS and bearer-token auth on real servers over loopback; admission control."""

from __future__ import annotations

import asyncio
import re
import subprocess

import grpc
import pytest
import pytest_asyncio

from coolfusion.clients.client import FusionClient
from coolfusion.orchestrator.admission import Admission
from coolfusion.orchestrator.server import build_service as build_orchestrator
from coolfusion.protos import tokenizer_pb2 as tpb
from coolfusion.protos import tokenizer_pb2_grpc as tpb_grpc
from coolfusion.protos import worker_pb2_grpc
from coolfusion.services.common.errors import ResourceExhausted
from coolfusion.services.common.security import ClientTls, ServerTls, aio_channel
from coolfusion.services.common.server import CHANNEL_OPTIONS, GrpcService
from coolfusion.services.tokenizer.server import build_service as build_tokenizer_service
from coolfusion.services.worker.model import WorkerCore
from coolfusion.services.worker.server import SERVICE_NAME as WORKER_SERVICE
from coolfusion.services.worker.server import WorkerServicer


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1/localhost, and a client certificate; plus a stranger CA."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={ca}",
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.pem",
            cwd=d,
        )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ca, ext in (("server", "ca", ["-extfile", "san.ext"]), ("client", "ca", []), ("rogue", "other-ca", [])):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            f"{ca}.pem",
            "-CAkey",
            f"{ca}.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.pem",
            *ext,
            cwd=d,
        )
    return d


async def _list(address: str, tls: ClientTls | None):
    channel = aio_channel(address, CHANNEL_OPTIONS, tls) if tls else grpc.aio.insecure_channel(address)
    try:
        stub = tpb_grpc.TokenizerServiceStub(channel)
        return await stub.ListTokenizers(tpb.ListTokenizersRequest(), timeout=5)
    finally:
        await channel.close()


@pytest_asyncio.fixture(loop_scope="session")
async def mtls_service(pki, tokenizer_registry):
    tls = ServerTls(str(pki / "server.pem"), str(pki / "server.key"), client_ca_file=str(pki / "ca.pem"))
    service = build_tokenizer_service(tokenizer_registry)
    service.tls = tls
    port = await service.start()
    yield f"127.0.0.1:{port}"
    await service.stop(0)


async def test_mtls_accepts_the_right_client_certificate(pki, mtls_service):
    reply = await _list(mtls_service, ClientTls(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key")))
    assert {t.id for t in reply.tokenizers} == {"smollm2", "gemma3"}


# What a client sees when the server closes the connection in the TLS handshake (it refused the
# client), as opposed to "Connection refused" from a port nobody listens on.
SERVER_REFUSED = "Socket closed"


@pytest.mark.parametrize(
    "client",
    [
        "no-certificate",
        "certificate-from-another-ca",
        "plaintext",
    ],
)
async def test_mtls_refuses_other_clients(pki, mtls_service, client):
    """The server is up and serving (the right client gets through, before and after), it accepts
    the connection and closes it in the handshake: a refusal, not a dead or unreachable server."""
    right = ClientTls(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"))
    tls = {
        "no-certificate": ClientTls(str(pki / "ca.pem")),
        "certificate-from-another-ca": ClientTls(str(pki / "ca.pem"), str(pki / "rogue.pem"), str(pki / "rogue.key")),
        "plaintext": None,
    }[client]
    assert len((await _list(mtls_service, right)).tokenizers) == 2
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _list(mtls_service, tls)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert SERVER_REFUSED in info.value.details() and "Connection refused" not in info.value.details()
    assert len((await _list(mtls_service, right)).tokenizers) == 2


async def test_tls_client_refuses_a_server_its_ca_did_not_sign(pki, tokenizer_registry):
    """A client that trusts another CA fails the handshake on its side (certificate verification),
    against the same server that serves a client trusting the right CA."""
    service = build_tokenizer_service(tokenizer_registry)
    service.tls = ServerTls(str(pki / "server.pem"), str(pki / "server.key"))
    port = await service.start()
    try:
        ok = await _list(f"127.0.0.1:{port}", ClientTls(str(pki / "ca.pem")))
        assert len(ok.tokenizers) == 2
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _list(f"127.0.0.1:{port}", ClientTls(str(pki / "other-ca.pem")))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "CERTIFICATE_VERIFY_FAILED" in info.value.details(), info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _list(f"127.0.0.1:{port}", None)  # plaintext to a TLS server
        assert SERVER_REFUSED in info.value.details()
        assert len((await _list(f"127.0.0.1:{port}", ClientTls(str(pki / "ca.pem")))).tokenizers) == 2
    finally:
        await service.stop(0)


async def test_orchestrator_reaches_workers_over_mutual_tls(pki, cluster, monkeypatch):
    """Workers that require client certificates: the orchestrator's channels (COOLFUSION_TLS_*)
    carry the fusion, with the same answer as over plaintext; without its certificate it gets
    UNAVAILABLE naming the worker."""
    server_tls = ServerTls(str(pki / "server.pem"), str(pki / "server.key"), client_ca_file=str(pki / "ca.pem"))
    services, addresses = [], {}
    for name in ("smollm2", "gemma3"):
        shared = cluster.cores[name]
        core = WorkerCore(
            name,
            shared.spec,
            device="cpu",
            boundary=cluster.registry.common_boundary,
            model=shared.model,
            hf_tokenizer=shared.tokenizer.hf,
        )
        servicer = WorkerServicer(core)
        service = GrpcService(
            lambda server, s=servicer: worker_pb2_grpc.add_ModelWorkerServicer_to_server(s, server),
            [WORKER_SERVICE],
            tls=server_tls,
        )
        addresses[name] = f"127.0.0.1:{await service.start()}"
        services.append(service)
    orchestrators = []
    try:
        kwargs = dict(mode="cool", models=["smollm2", "gemma3"], max_new_tokens=8)
        async with FusionClient(cluster.address) as plain:
            expected = await plain.generate("1, 2, 3,", **kwargs)
        for env in (
            {
                "COOLFUSION_TLS_CA": "ca.pem",
                "COOLFUSION_TLS_CLIENT_CERT": "client.pem",
                "COOLFUSION_TLS_CLIENT_KEY": "client.key",
            },
            {"COOLFUSION_TLS_CA": "ca.pem"},
        ):
            with monkeypatch.context() as m:  # read when the orchestrator's worker channels are made
                for key, file in env.items():
                    m.setenv(key, str(pki / file))
                service, engine = build_orchestrator(addresses)
            orchestrators.append((service, engine))
            address = f"127.0.0.1:{await service.start()}"
            async with FusionClient(address) as client:  # plaintext to the orchestrator itself
                if "COOLFUSION_TLS_CLIENT_CERT" in env:
                    reply = await client.generate("1, 2, 3,", **kwargs)
                    assert (reply.text, [s.model for s in reply.segments]) == (
                        expected.text,
                        [s.model for s in expected.segments],
                    )
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await client.generate("1, 2, 3,", **kwargs)
                    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                    # The first Open to fail ends the request (the other is cancelled): either worker.
                    details = info.value.details()
                    assert re.search(r"worker (smollm2|gemma3) at ", details) and SERVER_REFUSED in details
    finally:
        for service, engine in orchestrators:
            await service.stop(0)
            for worker in engine.workers.values():
                await worker.aclose()
        for service in services:
            await service.stop(0)


async def test_bearer_token_on_the_fusion_service(cluster):
    service, _ = build_orchestrator({"smollm2": cluster.worker_addresses["smollm2"]}, auth_tokens=["s3cret", "other"])
    port = await service.start()
    address = f"127.0.0.1:{port}"
    try:
        for token in (None, "", "wrong"):
            async with FusionClient(address, token=token or "") as client:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await client.generate("1, 2, 3,", mode="single:smollm2", max_new_tokens=2)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in client.stream("1, 2,", mode="single:smollm2", max_new_tokens=2):
                        pass
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with FusionClient(address, token="s3cret") as client:
            reply = await client.generate("1, 2, 3,", mode="single:smollm2", max_new_tokens=2)
            assert reply.text
    finally:
        await service.stop(0)


async def test_admission_refuses_at_once_beyond_running_plus_queue():
    admission = Admission(max_concurrent=1, max_queue=1)
    release = asyncio.Event()

    async def hold():
        async with admission.slot():
            await release.wait()

    running = asyncio.create_task(hold())
    await asyncio.sleep(0)
    queued = asyncio.create_task(hold())
    await asyncio.sleep(0)
    assert (admission.running, admission.waiting) == (1, 1)
    with pytest.raises(ResourceExhausted, match="server busy"):
        async with admission.slot():
            pass
    release.set()
    await asyncio.gather(running, queued)
    assert (admission.running, admission.waiting) == (0, 0)
