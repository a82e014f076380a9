"""OpenAI's error object (``{"error": {"message", "type", "param", "code"}}``) and the HTTP status
for each failure: bad input, auth, unknown model and the Fusion service's gRPC statuses."""

from __future__ import annotations

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

RETRY_AFTER_S = 1  # what a 429 tells the caller to wait: the orchestrator's queue turns over fast

# gRPC status -> (HTTP status, OpenAI error type)
GRPC_TO_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


class ApiError(Exception):
    """A failure the caller gets as an OpenAI error object with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_rpc_error(exc: grpc.RpcError) -> ApiError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    status, kind = GRPC_TO_HTTP.get(code, (500, "server_error"))
    details = (exc.details() if hasattr(exc, "details") else "") or code.name
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
    return ApiError(status, details, kind, code=code.name.lower(), headers=headers)


def _param(loc: tuple) -> str:
    # ("body", "messages", 0, "role") -> "messages[0].role"
    parts = [p for p in loc if p != "body"]
    text = ""
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text


def validation_error(exc: RequestValidationError) -> ApiError:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = _param(tuple(first.get("loc", ())))
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    return ApiError(400, message, param=param or None, code="invalid_value")


def install_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI error object; pydantic's 422 becomes 400 as OpenAI answers."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), kind).response()

    @app.exception_handler(grpc.RpcError)
    async def rpc_error(request: Request, exc: grpc.RpcError):
        return from_rpc_error(exc).response()
