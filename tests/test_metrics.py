"""Prometheus metrics over HTTP, counted by the interceptor and the Fusion service."""

from __future__ import annotations

import socket
import urllib.request

import grpc
import pytest

from coolfusion.clients.client import FusionClient, build_request
from coolfusion.services.common.metrics import start_metrics_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _value(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


async def test_metrics_count_requests_errors_and_segments(cluster):
    port = start_metrics_server(_free_port(), "127.0.0.1")
    scrape = lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()  # noqa: E731
    before = scrape()
    async with FusionClient(cluster.address) as client:
        reply = await client.generate("1, 2, 3,", mode="single:smollm2", max_new_tokens=4)
        with pytest.raises(grpc.aio.AioRpcError):
            await client.generate("1, 2, 3,", mode="nonsense")
    after = scrape()
    ok = 'coolfusion_requests_total{code="OK",method="/coolfusion.v1.Fusion/Generate"}'
    bad = 'coolfusion_requests_total{code="INVALID_ARGUMENT",method="/coolfusion.v1.Fusion/Generate"}'
    assert _value(after, ok) == _value(before, ok) + 1
    assert _value(after, bad) == _value(before, bad) + 1
    seg = 'coolfusion_segments_total{model="smollm2"}'
    assert _value(after, seg) == _value(before, seg) + len(reply.segments)
    assert 'coolfusion_request_seconds_bucket{le="0.005",method="/coolfusion.v1.ModelWorker/NextText"}' in after


async def test_request_id_tags_structured_logs_and_comes_back(cluster, caplog):
    import json
    import logging

    from coolfusion.services.common.logs import JsonFormatter

    caplog.set_level(logging.INFO, logger="coolfusion.orchestrator.server")
    async with FusionClient(cluster.address) as client:
        call = client.stub.Generate(
            build_request("1, 2, 3,", mode="single:smollm2", max_new_tokens=2, request_id="req-42")
        )
        reply = await call
        trailing = tuple(await call.trailing_metadata())
    assert reply.text
    # Two tokens, no stop sequence: it ends at its budget unless the second token is EOS.
    if reply.segments[-1].eos:
        assert reply.finish_reason == "eos"
    else:
        assert (reply.finish_reason, reply.usage[0].output_tokens) == ("length", 2)
    assert ("x-request-id", "req-42") in trailing
    lines = [
        json.loads(JsonFormatter().format(r)) for r in caplog.records if getattr(r, "request_id", None) == "req-42"
    ]
    assert [line["msg"] for line in lines] == ["generation started", "generation finished"]
    # The finished line says how this request ended.
    assert (lines[-1]["finish_reason"], lines[-1]["segments"]) == (reply.finish_reason, len(reply.segments))
    assert lines[-1]["models"] == ["smollm2"] and lines[-1]["request_id"] == "req-42"
