"""The one ASGI middleware: request ids, the body limit, who is calling, and request metrics.

It is the outermost layer (`EdgeApp`), outside the layers FastAPI puts around every app
(its error, telemetry and body-limit middlewares and its own `__call__`s): the hot lookup
(`app.http.fast_path`) is answered before any of them, so it does what the outermost of
them did for it, a logged JSON 500 for anything unexpected. Pure ASGI (no
BaseHTTPMiddleware, which costs a task per request), and one layer for all of it: the
headers are read in one pass, a declared Content-Length is checked before anything is
read, an open gateway refuses what does not come from this machine
(`app.http.local_only`), and a request is counted in plain lists in place, exported to
Prometheus only when scraped.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from functools import partial
from secrets import token_hex

from fastapi import FastAPI
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import GatewayError, PayloadTooLarge
from app.http.auth import Client, KeyRing
from app.http.client_limits import ClientLimits
from app.http.errors import error_response, internal_error_response
from app.http.fast_path import PATH, FastLookup
from app.http.local_only import LocalOnly
from app.http.metrics import RequestMetrics
from app.logs import request_id

access = logging.getLogger("app.access")
log = logging.getLogger("app")

# X-Request-ID values we echo: a bounded token of printable characters, nothing else.
_SANE_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")
# Generated ids: a random prefix per process and a counter (os.urandom per request is a
# system call, 9 us in `bench/middleware.py` on this machine).
_ID_PREFIX = token_hex(6).encode() + b"-"
_ids = itertools.count(1)
_READ = frozenset(
    {
        *(b"content-length", b"host", b"x-request-id", b"origin", b"sec-fetch-site"),
        *(b"x-forwarded-for", b"forwarded", b"content-type"),
    }
)
"""The headers this middleware reads."""


class GatewayMiddleware:
    """The one layer every HTTP request passes: request id, body limit, who is calling, metrics.

    Paths under `/api/` (and `/metrics` with METRICS_REQUIRE_KEY) need a known key and are
    counted against the client's requests a minute; the `Client` is left in the scope
    for the routes (`scope["gateway.client"]`). Roles are checked by the routes.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        large_bodies: dict[str, int] | None = None,
        metrics: RequestMetrics,
        keys: KeyRing,
        limits: ClientLimits,
        metrics_require_key: bool = False,
        access_log: bool = False,
        local_only: LocalOnly | None = None,
        trust_forwarded: bool = False,
        fast_lookup: FastLookup | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.large_bodies = large_bodies or {}
        self.metrics = metrics
        self.keys = keys
        self.limits = limits
        self.metrics_require_key = metrics_require_key
        self.access_log = access_log
        self.local_only = local_only if keys.open else None
        # Without trusted proxies, a client that says it was forwarded is not believed: a
        # server that trusts the header anyway (plain uvicorn trusts loopback) would let
        # every request pick its own name, and so its own limits.
        self.trust_forwarded = trust_forwarded
        self.fast_lookup = fast_lookup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = length = host = origin = fetch_site = content_type = None
        forwarded = False
        for name, value in scope["headers"]:
            if name not in _READ:  # most headers: one set look-up, not a chain of compares
                continue
            if name == b"content-length":
                length = value
            elif name == b"host":
                host = value
            elif name == b"x-request-id" and _SANE_ID.fullmatch(value):
                rid = value
            elif name == b"origin":
                origin = value
            elif name == b"sec-fetch-site":
                fetch_site = value
            elif name == b"content-type":
                if content_type is None:  # the first, as `request.headers` gives the route
                    content_type = value
            elif name == b"x-forwarded-for" or name == b"forwarded":
                forwarded = True
        rid = rid or b"%s%x" % (_ID_PREFIX, next(_ids))
        token = request_id.set(rid.decode())
        status = 0  # until the response starts
        complete = False  # until its last body message is sent
        client: Client | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid)]
                await send(message)
            else:
                await send(message)  # complete only once the server took the last part
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    complete = True

        try:
            path: str = scope["path"]
            root: str = scope.get("root_path", "")
            if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
                # A server with a root path (`--root-path`) sends it in the path too, as
                # ASGI says; the router matches without it, and so is every path judged here.
                path = path[len(root) :] or "/"
            limit = self.large_bodies.get(path, self.max_bytes)
            if length is not None and (not length.isdigit() or int(length) > limit):
                raise _too_large(limit)
            local = self.local_only
            if local is not None:
                server = scope.get("server")
                if type(server) is list:  # some servers send a list: ASGI allows either
                    server = tuple(server)
                # A socket and Host judged before, and no sign of a page behind the
                # request: nothing to ask.
                if (
                    origin is not None
                    or fetch_site is not None
                    or host not in local.seen
                    or server not in local.seen
                ):
                    refused = local.refusal(scope["method"], path, server, host, origin, fetch_site)
                    if refused is not None:
                        raise refused
            if path.startswith("/api/") or (path == "/metrics" and self.metrics_require_key):
                if forwarded and not self.trust_forwarded:
                    address = "forwarded"
                else:
                    address = scope["client"][0] if scope.get("client") else "unknown"
                client = scope["gateway.client"] = self.keys.identify(scope["headers"], address)
                self.limits.admit(client)
                fast = self.fast_lookup
                if (
                    fast is not None
                    and length
                    and path == PATH
                    and scope["method"] == "POST"
                    and not scope.get("root_path")
                ):
                    # The hot lookup, answered here when memory holds it (`app.http.fast_path`).
                    forward = await fast.serve(scope, receive, send_with_id, client, content_type)
                    if forward is None:
                        return
                    receive = forward
            # The server holds a body with a Content-Length to it: only others are counted.
            await self.app(scope, receive if length else _limited(receive, limit), send_with_id)
        except GatewayError as exc:  # raised here, before the app answered
            if status:
                raise
            await error_response(exc)(scope, receive, send_with_id)
        except Exception as exc:
            if status:
                # FastAPI's error layer logged it (with the request id) and answered, then
                # raised it again for the server, which would log it a second time. Only
                # an answer cut short (the server must close the connection) and a client
                # that left are the server's to see.
                if complete and not isinstance(exc, ClientDisconnect):
                    return
                raise
            # Raised here or in the fast path, outside FastAPI's error layer.
            log.exception("unexpected error serving %s %s", scope["method"], scope["path"])
            await internal_error_response()(scope, receive, send_with_id)
        finally:
            self._finish(scope, status or 500, started, client)
            request_id.reset(token)

    def _finish(self, scope: Scope, status: int, started: float, client: Client | None) -> None:
        # The route's template (`/api/users/{user_id}`), never the raw path: the label
        # set stays bounded.
        route = getattr(scope.get("route"), "path", "unmatched")
        elapsed = time.perf_counter() - started
        self.metrics.observe(scope["method"], route, status, elapsed)
        if self.access_log:
            access.info(
                "%s %s %d",
                scope["method"],
                route,
                status,
                extra={
                    "method": scope["method"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                    "key": client.name if client else None,
                },
            )


class EdgeApp(FastAPI):
    """FastAPI, with every HTTP request passing `edge` (a `GatewayMiddleware` around
    `inner()`) before anything of FastAPI's: see the module docstring."""

    edge: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        edge = self.edge
        if edge is None or scope["type"] != "http":
            await super().__call__(scope, receive, send)
        else:
            await edge(scope, receive, send)

    def inner(self) -> ASGIApp:
        """FastAPI's own handling of a request: what `edge` wraps."""
        return partial(FastAPI.__call__, self)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body must be at most {limit} bytes")


def _limited(receive: Receive, limit: int) -> Receive:
    """`receive`, refusing a body (sent without a Content-Length) past `limit` bytes."""
    received = 0

    async def limited_receive() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _too_large(limit)
        return message

    return limited_receive
