"""The application factory and its lifespan. `uvicorn app.main:app` serves `create_app()`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from app import __version__
from app.clock import Clock, wall_clock
from app.config import Settings
from app.errors import GatewayError
from app.gateway import Gateway
from app.logs import configure_logging
from app.metrics import create_registry
from app.middleware import GatewayMiddleware, RequestMetrics
from app.models import DEFAULT_MAX_IDS, users_request_schema
from app.routers import monitoring, users
from app.store import UserStore, create_store
from app.upstream import FreelancerClient, create_http_client

log = logging.getLogger("app")

SIMULATOR_BASE = "http://simulator.invalid/api/users/0.1/users"
HTTP_ERROR_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}

DESCRIPTION = """
Answers "who are these Freelancer users?" for batches of ids from its own cache, and
calls Freelancer's rate-limited API only for ids it has never seen: once per id however
many clients ask at the same moment, in as few batched calls as possible.
"""


def create_app(
    settings: Settings | None = None,
    *,
    store: UserStore | None = None,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
    clock: Clock = wall_clock,
) -> FastAPI:
    """Build the app. Nothing is opened here: the lifespan opens the store, client and worker.

    `store` and `upstream_transport` replace the configured store and the HTTP transport
    to Freelancer, and `clock` the wall clock freshness is measured on (tests use them to
    fake the boundary and to step time).
    """
    settings = settings or Settings()
    app = FastAPI(
        title="Freelancer user-info gateway",
        version=__version__,
        description=DESCRIPTION,
        lifespan=_lifespan,
        # The gateway exports Prometheus metrics; FastAPI's OpenTelemetry instrumentation
        # would only ask, on every request, whether a provider is configured.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.settings = settings
    app.state.store = store
    app.state.upstream_transport = upstream_transport
    app.state.clock = clock
    app.state.gateway = None
    request_metrics = RequestMetrics()
    app.state.registry = create_registry(lambda: app.state.gateway, request_metrics)
    app.router.routes.insert(0, users.hot_route)
    app.include_router(users.router)
    app.include_router(monitoring.router)
    _install_error_handlers(app)
    # Our own body limit, not FastAPI's `max_body_size`: that one answers a declared
    # oversized Content-Length with a plain-text 413, and every error here is JSON.
    app.add_middleware(
        GatewayMiddleware, max_bytes=settings.max_body_bytes, metrics=request_metrics
    )
    if settings.max_users_per_request != DEFAULT_MAX_IDS:
        _document_max_ids(app, settings.max_users_per_request)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    transport = app.state.upstream_transport
    base = settings.upstream_base
    if settings.upstream_kind == "simulator" and transport is None:
        from app.simulator import SimulatorConfig, create_simulator_app

        simulator = create_simulator_app(SimulatorConfig(latency_ms=settings.simulator_latency_ms))
        transport = httpx.ASGITransport(app=simulator)
        base = SIMULATOR_BASE
        log.warning(
            "demo mode: no FREELANCER_OAUTH_TOKEN, FREELANCER_CLIENT_ID or FREELANCER_API_BASE "
            "is set, so users come from the built-in Freelancer simulator, not Freelancer"
        )
    store: UserStore = app.state.store or create_store(settings)
    async with create_http_client(settings, transport) as http:
        clock: Clock = app.state.clock
        gateway = Gateway(
            settings=settings,
            store=store,
            upstream=FreelancerClient(http, base_url=base, clock=clock),
            clock=clock,
        )
        await gateway.start()
        app.state.gateway = gateway
        log.info(
            "gateway started: store=%s upstream=%s batch_size=%d concurrency=%d",
            store.kind,
            settings.upstream_kind,
            settings.batch_size,
            settings.upstream_concurrency,
        )
        try:
            yield
        finally:
            app.state.gateway = None
            await gateway.stop()
            log.info("gateway stopped")


def _json_error(
    status: int,
    body: dict[str, Any],
    retry_after: float | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    headers = dict(headers or {})
    if retry_after:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
    )


def _install_error_handlers(app: FastAPI) -> None:
    """The one place errors become HTTP responses: JSON bodies, never a traceback."""

    async def gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return _json_error(exc.status_code, exc.body(), exc.retry_after)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        problems = []
        for error in exc.errors()[:5]:
            where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
            problems.append(f"{where}: {error.get('msg', 'invalid')}" if where else error["msg"])
        return _json_error(422, {"error": "invalid_request", "detail": "; ".join(problems)})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = HTTP_ERROR_CODES.get(exc.status_code, "http_error")
        body = {"error": code, "detail": str(exc.detail)}
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return _json_error(exc.status_code, body, headers=headers)

    async def unexpected_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return _json_error(
            500, {"error": "internal_error", "detail": "internal error; see the log"}
        )

    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette names only the first route's)."""
    methods: set[str] = set()
    for route in _leaf_routes(request.app.routes):
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def _leaf_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    # FastAPI 0.160+ keeps an included router as one route wrapping the router's own.
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _leaf_routes(inner.routes)
        else:
            yield route


def _document_max_ids(app: FastAPI, max_ids: int) -> None:
    """Make `/docs` show the configured MAX_USERS_PER_REQUEST instead of the default."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        operation = schema["paths"]["/api/users"]["post"]
        operation["requestBody"] = users_request_schema(max_ids)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def __getattr__(name: str) -> Any:
    # `uvicorn app.main:app` reads `app` from here; building it lazily keeps importing this
    # module free of side effects (settings are read only when the app is asked for).
    if name == "app":
        settings = Settings()
        configure_logging(settings.log_level, force=False)
        application = create_app(settings)
        globals()["app"] = application
        return application
    raise AttributeError(name)
