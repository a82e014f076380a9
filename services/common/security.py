"""TLS / mutual TLS for every service and bearer-token auth for the public Fusion service.

Paths come from flags or the environment:

* server: ``COOLFUSION_TLS_CERT`` + ``COOLFUSION_TLS_KEY`` (TLS); with ``COOLFUSION_TLS_CLIENT_CA``
  the server also requires a client certificate signed by that CA (mTLS);
* client (CLI, orchestrator -> workers, worker -> tokenizer service): ``COOLFUSION_TLS_CA`` (the
  CA that signed the servers), and ``COOLFUSION_TLS_CLIENT_CERT`` + ``COOLFUSION_TLS_CLIENT_KEY``
  for mTLS;
* ``COOLFUSION_AUTH_TOKENS``: comma-separated bearer tokens the Fusion service accepts
  (``authorization: Bearer <token>`` metadata); ``COOLFUSION_AUTH_TOKEN`` is what clients send.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

# Health and reflection stay open so probes work without a token.
UNAUTHENTICATED_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


@dataclass
class ServerTls:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None  # set: mutual TLS

    @classmethod
    def from_env(cls) -> ServerTls | None:
        cert, key = os.environ.get("COOLFUSION_TLS_CERT"), os.environ.get("COOLFUSION_TLS_KEY")
        if not cert or not key:
            return None
        return cls(cert, key, os.environ.get("COOLFUSION_TLS_CLIENT_CA") or None)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(_read(self.key_file), _read(self.cert_file))],
            root_certificates=_read(self.client_ca_file),
            require_client_auth=self.client_ca_file is not None,
        )


@dataclass
class ClientTls:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @classmethod
    def from_env(cls) -> ClientTls | None:
        ca = os.environ.get("COOLFUSION_TLS_CA")
        if not ca:
            return None
        return cls(ca, os.environ.get("COOLFUSION_TLS_CLIENT_CERT"), os.environ.get("COOLFUSION_TLS_CLIENT_KEY"))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file),
            private_key=_read(self.key_file),
            certificate_chain=_read(self.cert_file),
        )


def aio_channel(address: str, options, tls: ClientTls | None = None) -> grpc.aio.Channel:
    tls = tls if tls is not None else ClientTls.from_env()
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.credentials(), options=options)


def sync_channel(address: str, options, tls: ClientTls | None = None) -> grpc.Channel:
    tls = tls if tls is not None else ClientTls.from_env()
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.credentials(), options=options)


def tokens_from_env() -> list[str]:
    return [t.strip() for t in os.environ.get("COOLFUSION_AUTH_TOKENS", "").split(",") if t.strip()]


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <one of tokens>`` with UNAUTHENTICATED."""

    def __init__(self, tokens: list[str]):
        if not tokens:
            raise ValueError("BearerTokenInterceptor needs at least one token")
        self.tokens = [t.encode() for t in tokens]

    def _ok(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                offered = value[len("Bearer ") :].encode()
                return any(hmac.compare_digest(offered, t) for t in self.tokens)
        return False

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(UNAUTHENTICATED_METHODS) or self._ok(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        if handler.unary_stream is not None:

            async def deny_stream(request, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
                yield  # pragma: no cover - makes this an async generator

            return grpc.unary_stream_rpc_method_handler(
                deny_stream, handler.request_deserializer, handler.response_serializer
            )
        return grpc.unary_unary_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)


def token_metadata(token: str | None = None) -> tuple[tuple[str, str], ...]:
    token = token if token is not None else os.environ.get("COOLFUSION_AUTH_TOKEN")
    return (("authorization", f"Bearer {token}"),) if token else ()
