"""The gateway's side of the Fusion gRPC service: one channel (TLS from COOLFUSION_TLS_* as every
client), the caller's bearer token forwarded as metadata, and the model ids the service offers."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coolfusion.protos import fusion_pb2 as pb
from coolfusion.protos import fusion_pb2_grpc as pb_grpc
from coolfusion.protos.fusion_wire import is_mode

from ..common.security import ClientTls, aio_channel
from ..common.server import CHANNEL_OPTIONS
from .errors import ApiError

HEALTH_TIMEOUT_S = 5.0


def call_metadata(authorization: str | None, request_id: str) -> tuple[tuple[str, str], ...]:
    """The caller's ``Authorization`` header goes through unchanged: the orchestrator checks it
    against its own tokens, so both APIs accept exactly the same tokens from one source."""
    metadata = [("x-request-id", request_id)]
    if authorization:
        metadata.append(("authorization", authorization))
    return tuple(metadata)


def model_ids(reply: pb.ListModelsResponse) -> list[str]:
    """One id per usable configuration: the fusion modes, then ``single:<model>`` per model."""
    return [m for m in reply.modes if is_mode(m)]


class Upstream:
    def __init__(self, address: str, request_timeout: float | None = None, tls: ClientTls | None = None):
        self.address = address
        self.request_timeout = request_timeout
        self.tls = tls
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.FusionStub
        self.health: health_pb2_grpc.HealthStub
        self.known_models: set[str] = set()
        # The orchestrator's ListModels `max_requests`: a request of more choices never fits (0: unknown).
        self.max_requests = 0

    def open(self) -> None:
        """In the serving event loop: grpc.aio channels belong to the loop they are used in."""
        self.channel = aio_channel(self.address, CHANNEL_OPTIONS, self.tls)
        self.stub = pb_grpc.FusionStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    async def list_models(self, metadata) -> list[str]:
        reply = await self.stub.ListModels(pb.ListModelsRequest(), timeout=self.request_timeout, metadata=metadata)
        self.known_models = set(model_ids(reply))
        self.max_requests = reply.max_requests
        return model_ids(reply)

    async def check_model(self, model: str, metadata, param: str = "model") -> None:
        """404 for an id the service does not offer. A known id costs nothing; an unknown one is
        looked up again with the caller's token (so a bad token is a 401, not a 404)."""
        if model in self.known_models:
            return
        if model not in await self.list_models(metadata):
            offered = ", ".join(sorted(self.known_models))
            raise ApiError(
                404, f"model {model!r} does not exist; models: {offered}", "not_found_error", param, "model_not_found"
            )

    def generate(self, request: pb.GenerateRequest, metadata):
        return self.stub.Generate(request, timeout=self.request_timeout, metadata=metadata)

    def stream(self, request: pb.GenerateRequest, metadata):
        return self.stub.GenerateStream(request, timeout=self.request_timeout, metadata=metadata)

    async def serving(self) -> str:
        """The orchestrator's overall gRPC health status name, or why it could not be asked."""
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT_S)
        except grpc.RpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
