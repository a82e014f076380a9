"""The trust boundary (docs/security.md): with an internal token set, every RPC of the workers and
the tokenizer service refuses a caller without it, over the real wire; health and reflection stay
open; the fused path works with the token on.

The RPCs come from the services' protobuf descriptors (and the services from the servers'
reflection), so an RPC or service added later is covered without touching this file.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import pytest_asyncio
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from coolfusion.clients import cli
from coolfusion.clients.client import FusionClient
from coolfusion.clients.launcher import LocalCluster
from coolfusion.protos import tokenizer_pb2, worker_pb2  # noqa: F401 - registers both services' descriptors
from coolfusion.services.common import security

TOKEN = "internal-" + "x" * 32
OPEN_SERVICES = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
PROMPT = "Question: What is the capital of France?\nAnswer:"


def test_internal_tokens_and_the_launchers_default(monkeypatch, tmp_path):
    monkeypatch.delenv(security.INTERNAL_TOKEN_ENV, raising=False)
    assert security.internal_tokens("new, old,") == ["new", "old"] and security.internal_token("new,old") == "new"
    assert security.internal_tokens() == [] and security.internal_token("") is None
    # Embedded services are closed by default: a fresh random token per launch.
    first, second = (LocalCluster(["smollm2"], run_dir=str(tmp_path / d)).internal_token for d in "ab")
    assert len(first) >= 32 and first != second
    monkeypatch.setenv(security.INTERNAL_TOKEN_ENV, "mine,older")
    assert security.internal_token() == "mine"
    assert LocalCluster(["smollm2"], run_dir=str(tmp_path / "c")).internal_token == "mine"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def guarded(bundled_models):
    """The in-process cluster (shared weights) with the internal token on every hop."""
    from cluster import start_cluster, stop_cluster

    c = await start_cluster(bundled_models, internal_token=TOKEN)
    yield c
    await stop_cluster(c)


async def _services(channel) -> set[str]:
    """What the server lists through reflection, asked without any token."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for reply in stub.ServerReflectionInfo(iter([request]), timeout=30):
        return {s.name for s in reply.list_services_response.service}
    raise AssertionError("no reflection reply")


async def _status(channel, service, method, metadata) -> grpc.StatusCode:
    """One call of ``method`` with an empty request: its status (OK when it answered)."""
    request_type, response_type = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]
    stub = kind(
        f"/{service.full_name}/{method.name}",
        request_serializer=request_type.SerializeToString,
        response_deserializer=response_type.FromString,
    )
    request = iter([request_type()]) if method.client_streaming else request_type()
    try:
        call = stub(request, metadata=metadata, timeout=120)
        if method.server_streaming:
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_every_internal_rpc_refuses_a_caller_without_the_token(guarded):
    callers = {
        "none": (),
        "wrong": (("authorization", "Bearer not-" + TOKEN),),
        "right": security.token_metadata(TOKEN),
    }
    checked = []
    for address in (guarded.tokenizer_address, guarded.worker_addresses["smollm2"]):
        async with grpc.aio.insecure_channel(address) as channel:
            names = await _services(channel)  # reflection is open
            assert names > OPEN_SERVICES
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # health is open
            for name in sorted(names - OPEN_SERVICES):
                service = descriptor_pool.Default().FindServiceByName(name)
                for method in service.methods:
                    codes = {who: await _status(channel, service, method, md) for who, md in callers.items()}
                    refused = {who for who, code in codes.items() if code == grpc.StatusCode.UNAUTHENTICATED}
                    assert refused == {"none", "wrong"}, (f"{name}/{method.name}", codes)
                    checked.append(method.name)
    # The enumeration found both services' RPCs (a guard against enumerating nothing).
    assert {"Open", "NextText", "ScoreCandidates", "Close", "Info"} <= set(checked)
    assert {"CommonBoundary", "CountContext", "Encode", "ListTokenizers"} <= set(checked)


async def test_refusal_names_the_credential(guarded):
    async with grpc.aio.insecure_channel(guarded.worker_addresses["gemma3"]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            info = f"/{worker_pb2.DESCRIPTOR.services_by_name['ModelWorker'].full_name}/Info"
            await channel.unary_unary(info)(b"", timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refused.value.details() == f"missing or invalid internal token (${security.INTERNAL_TOKEN_ENV})"


async def test_fused_generation_with_the_internal_token_on(guarded, cluster):
    """Orchestrator -> workers, orchestrator -> tokenizer (admission) and workers -> tokenizer
    (boundaries) all carry the token; the output is the open cluster's."""
    models = ["smollm2", "gemma3"]
    async with (
        FusionClient(guarded.address, timeout=300) as closed,
        FusionClient(cluster.address, timeout=300) as open_,
    ):
        got = await closed.generate(PROMPT, models=models, max_new_tokens=8)
        want = await open_.generate(PROMPT, models=models, max_new_tokens=8)
    assert got.text.strip() and got.text == want.text
    assert [s.model for s in got.segments] == [s.model for s in want.segments]
    assert all(len(s.candidates) == 2 for s in got.segments)


async def test_drain_needs_the_token_healthcheck_does_not(guarded, monkeypatch, capsys):
    address = guarded.worker_addresses["smollm2b"]
    drain = ["drain", address, "--min-wait", "0", "--timeout", "0"]
    monkeypatch.delenv(security.INTERNAL_TOKEN_ENV, raising=False)
    assert await asyncio.to_thread(cli.main, ["healthcheck", address]) == 0
    assert await asyncio.to_thread(cli.main, drain) == 1
    assert "COOLFUSION_INTERNAL_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv(security.INTERNAL_TOKEN_ENV, TOKEN)
    assert await asyncio.to_thread(cli.main, drain) == 0
    assert "unreachable" not in capsys.readouterr().err
