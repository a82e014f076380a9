"""Server interceptor that turns exceptions from the cores into precise gRPC statuses.

Callers get a status and a one-line message, never a traceback; unexpected errors are logged
with their traceback here and reported as INTERNAL.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time

import grpc

from .errors import InvalidArgument, status_for
from .metrics import LATENCY, REQUESTS

log = logging.getLogger(__name__)


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception):
    code = status_for(exc)
    REQUESTS.labels(method, code.name).inc()
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method)
        message = f"internal error in {method}: {type(exc).__name__}: {exc}"
    else:
        log.info("%s -> %s: %s", method, code.name, exc)
        if isinstance(exc, grpc.RpcError) and hasattr(exc, "details"):
            message = exc.details() or code.name
        else:
            message = str(exc) or type(exc).__name__
    await context.abort(code, message)


class MalformedRequest:
    """What a request that protobuf cannot parse (e.g. bad UTF-8 in a string field) becomes, so
    the handler can answer INVALID_ARGUMENT instead of grpc's generic UNKNOWN."""

    def __init__(self, error: Exception):
        self.error = error


def _safe(deserializer):
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends
            return MalformedRequest(exc)

    return parse


def _check_parsed(request) -> None:
    if isinstance(request, MalformedRequest):
        raise InvalidArgument(f"malformed request: {request.error}")


class ExceptionToStatusInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                started = time.perf_counter()
                try:
                    _check_parsed(request)
                    reply = await inner(request, context)
                    REQUESTS.labels(method, "OK").inc()
                    return reply
                except asyncio.CancelledError:
                    REQUESTS.labels(method, "CANCELLED").inc()
                    raise
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # noqa: BLE001 - every error becomes a status
                    await _abort(context, method, exc)
                finally:
                    LATENCY.labels(method).observe(time.perf_counter() - started)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, _safe(handler.request_deserializer), handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                started = time.perf_counter()
                try:
                    _check_parsed(request)
                    result = inner_stream(request, context)
                    if inspect.isasyncgen(result):
                        async for item in result:
                            yield item
                    else:
                        await result
                    REQUESTS.labels(method, "OK").inc()
                except asyncio.CancelledError:
                    REQUESTS.labels(method, "CANCELLED").inc()
                    raise
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    await _abort(context, method, exc)
                finally:
                    LATENCY.labels(method).observe(time.perf_counter() - started)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, _safe(handler.request_deserializer), handler.response_serializer
            )
        return handler
