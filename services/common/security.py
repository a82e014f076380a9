"""TLS / mutual TLS for every service and bearer-token auth for the public Fusion service.

Paths come from flags or the environment:

* server: ``COOLFUSION_TLS_CERT`` + ``COOLFUSION_TLS_KEY`` (TLS); with ``COOLFUSION_TLS_CLIENT_CA``
  the server also requires a client certificate signed by that CA (mTLS);
* client (CLI, orchestrator -> workers, worker -> tokenizer service): ``COOLFUSION_TLS_CA`` (the
  CA that signed the servers), and ``COOLFUSION_TLS_CLIENT_CERT`` + ``COOLFUSION_TLS_CLIENT_KEY``
  for mTLS;
* ``COOLFUSION_AUTH_TOKENS``: comma-separated bearer tokens the Fusion service accepts
  (``authorization: Bearer <token>`` metadata); ``COOLFUSION_AUTH_TOKEN`` is what clients send;
* ``COOLFUSION_INTERNAL_TOKEN``: the credential of the inside (docs/security.md). Workers and the
  tokenizer service accept only calls that carry one of its comma-separated tokens; the
  orchestrator, workers and tools that call them send the first on every call of the channel.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

import grpc

from ... import envs
from .config import comma_list

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
        cert, key = envs.read("COOLFUSION_TLS_CERT"), envs.read("COOLFUSION_TLS_KEY")
        if not cert or not key:
            return None
        return cls(cert, key, envs.read("COOLFUSION_TLS_CLIENT_CA"))

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
        ca = envs.read("COOLFUSION_TLS_CA")
        if not ca:
            return None
        return cls(ca, envs.read("COOLFUSION_TLS_CLIENT_CERT"), envs.read("COOLFUSION_TLS_CLIENT_KEY"))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file),
            private_key=_read(self.key_file),
            certificate_chain=_read(self.cert_file),
        )


INTERNAL_TOKEN_ENV = "COOLFUSION_INTERNAL_TOKEN"


def internal_tokens(value: str | None = None) -> list[str]:
    """The internal tokens a worker or tokenizer service accepts: ``value``, or
    $COOLFUSION_INTERNAL_TOKEN when it is None; comma-separated, so a rotation can accept the old
    and the new token at once. Empty: the inside is open (the network is its only guard)."""
    raw = envs.read(INTERNAL_TOKEN_ENV, "") if value is None else value
    return comma_list(raw)


def internal_token(value: str | None = None) -> str | None:
    """The internal token a caller of a worker or the tokenizer service sends: the first of
    ``internal_tokens(value)`` (None: none)."""
    tokens = internal_tokens(value)
    return tokens[0] if tokens else None


def new_internal_token() -> str:
    """A random internal token (what the launcher gives the services it starts)."""
    return secrets.token_urlsafe(32)


def _with_bearer(metadata, token: str) -> list[tuple[str, str]]:
    return [*(metadata or ()), ("authorization", f"Bearer {token}")]


class _AioBearer(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call of an aio channel."""

    def __init__(self, token: str):
        self.token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return details._replace(metadata=grpc.aio.Metadata(*_with_bearer(details.metadata, self.token)))

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


@dataclass(frozen=True)
class _SyncDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: object
    credentials: object
    wait_for_ready: bool | None
    compression: object


class _SyncBearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call of a synchronous channel."""

    def __init__(self, token: str):
        self.token = token

    def _details(self, d) -> _SyncDetails:
        return _SyncDetails(
            d.method,
            d.timeout,
            _with_bearer(d.metadata, self.token),
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)


def aio_channel(address: str, options, tls: ClientTls | None = None, token: str | None = None) -> grpc.aio.Channel:
    """``token``: a bearer token every call of the channel carries (the internal token)."""
    tls = tls if tls is not None else ClientTls.from_env()
    interceptors = [_AioBearer(token)] if token else None
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, tls.credentials(), options=options, interceptors=interceptors)


def sync_channel(address: str, options, tls: ClientTls | None = None, token: str | None = None) -> grpc.Channel:
    """``token``: a bearer token every call of the channel carries (the internal token)."""
    tls = tls if tls is not None else ClientTls.from_env()
    if tls is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        channel = grpc.secure_channel(address, tls.credentials(), options=options)
    return grpc.intercept_channel(channel, _SyncBearer(token)) if token else channel


def tokens_from_env() -> list[str]:
    return comma_list(envs.read("COOLFUSION_AUTH_TOKENS", ""))


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <one of tokens>`` with UNAUTHENTICATED;
    ``what`` names the credential in the refusal."""

    def __init__(self, tokens: list[str], what: str = "bearer token"):
        if not tokens:
            raise ValueError("BearerTokenInterceptor needs at least one token")
        self.tokens = [t.encode() for t in tokens]
        self.message = f"missing or invalid {what}"

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

        message = self.message

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - makes this an async generator

        # The refusal has the method's shape, so every kind of RPC gets UNAUTHENTICATED.
        make = _HANDLERS[(handler.request_streaming, handler.response_streaming)]
        return make(
            deny_stream if handler.response_streaming else deny,
            handler.request_deserializer,
            handler.response_serializer,
        )


_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def token_metadata(token: str | None = None) -> tuple[tuple[str, str], ...]:
    token = token if token is not None else envs.read("COOLFUSION_AUTH_TOKEN")
    return (("authorization", f"Bearer {token}"),) if token else ()
