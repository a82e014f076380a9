"""Prometheus metrics of the gateway, served at ``/metrics`` on its own HTTP port."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/health/live", "/metrics")

HTTP_REQUESTS = Counter(
    "coolfusion_gateway_requests_total", "HTTP requests by route and status code", ["route", "status"]
)
TIME_TO_FIRST_TOKEN = Histogram(
    "coolfusion_gateway_time_to_first_token_seconds",
    "streamed requests: time from the request to its first fused segment",
    ["route"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120),
)
TOKENS_PER_SECOND = Histogram(
    "coolfusion_gateway_tokens_per_second",
    "completion tokens per second of wall time, per request",
    ["route"],
    buckets=(0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)


class RequestMetrics:
    """ASGI middleware: counts every HTTP request by route and the status it was answered with
    (read from the response start, so streamed responses are counted without being buffered)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def capture(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            HTTP_REQUESTS.labels(route, str(status["code"])).inc()
