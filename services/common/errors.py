"""Exceptions with a gRPC status: plain-Python cores raise these, the interceptor maps them."""

from __future__ import annotations

import grpc


class CoolFusionError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(CoolFusionError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CoolFusionError, KeyError):
    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "not found"


class FailedPrecondition(CoolFusionError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(CoolFusionError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(CoolFusionError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status a caller should see for an exception raised by a core."""
    if isinstance(exc, CoolFusionError):
        return exc.code
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return exc.code()  # a downstream service's status passes through
    if isinstance(exc, (ValueError, TypeError, UnicodeError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, LookupError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL
