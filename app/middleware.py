"""The one ASGI middleware: the body limit and per-route request metrics, in a single layer.

Pure ASGI (no BaseHTTPMiddleware, which costs a task per request), and one layer rather
than two: a declared Content-Length is checked before anything is read, and a request is
counted in plain lists in place, exported to Prometheus only when scraped.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator

import orjson
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class BodyTooLarge(Exception):
    """Raised from `receive` when a streamed body passes the limit; answered with 413."""


class RequestMetrics(Collector):
    """Request latencies by method, route template and status, as a Prometheus histogram.

    Each label set holds a list of bucket counts and a sum, updated in place; the event
    loop is the only writer, so no lock is needed.
    """

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, int], list[float]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one request."""
        key = (method, route, status)
        series = self._series.get(key)
        if series is None:
            # Bucket counts (one more for +Inf), then the sum of the observed seconds.
            series = self._series[key] = [0.0] * (len(BUCKETS) + 2)
        series[bisect_left(BUCKETS, seconds)] += 1
        series[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "gateway_http_request_duration_seconds",
            "HTTP request latency by method, route and status.",
            labels=["method", "route", "status"],
        )
        for (method, route, status), series in self._series.items():
            cumulative, buckets = 0.0, []
            for bound, count in zip((*BUCKETS, float("inf")), series, strict=False):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            family.add_metric([method, route, str(status)], buckets, sum_value=series[-1])
        yield family


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


class GatewayMiddleware:
    """413 (JSON) for bodies over `max_bytes`; every HTTP request timed into `metrics`."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, metrics: RequestMetrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0  # until the response starts
        counting = True
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    await self._reject(send)
                    self._observe(scope, 413, started)
                    return
                # The server holds the body to its declared length: nothing to count.
                counting = False
                break
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive if counting else receive, send_status)
        except BodyTooLarge:
            if not status:
                status = 413
                await self._reject(send)
        finally:
            self._observe(scope, status or 500, started)

    def _observe(self, scope: Scope, status: int, started: float) -> None:
        # The route's template (`/api/users/{user_id}`), never the raw path: the label
        # set stays bounded.
        route = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.observe(scope["method"], route, status, time.perf_counter() - started)

    async def _reject(self, send: Send) -> None:
        body = orjson.dumps(
            {
                "error": "payload_too_large",
                "detail": f"the request body must be at most {self.max_bytes} bytes",
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
