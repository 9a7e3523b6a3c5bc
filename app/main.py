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
from app.access import KeyRing, check_protected_mode, load_keys
from app.clock import Clock, wall_clock
from app.config import Settings
from app.docs import install_docs
from app.errors import ConfigError, GatewayError
from app.gateway import Gateway
from app.gateway.budget import Budget, budget_windows
from app.gateway.coordinator import Coordinator
from app.jobs.runner import JobRunner
from app.jobs.store import create_job_store
from app.logs import add_secrets, configure_logging
from app.metrics import JobCollector, KeyUsageCollector, create_registry
from app.middleware import GatewayMiddleware, RequestMetrics, error_response
from app.openapi import customize_openapi
from app.quotas import ClientLimits
from app.routers import cache, dashboard, jobs, monitoring, users
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
        docs_url=None,  # app.docs serves /docs and /redoc with local assets
        redoc_url=None,
        # The gateway exports Prometheus metrics; FastAPI's OpenTelemetry instrumentation
        # would only ask, on every request, whether a provider is configured.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.settings = settings
    app.state.store = store
    app.state.upstream_transport = upstream_transport
    app.state.clock = clock
    app.state.gateway = app.state.jobs = None
    keys = KeyRing(load_keys(settings))
    check_protected_mode(settings, keys)
    app.state.keys = keys

    def processes() -> int:
        gateway: Gateway | None = app.state.gateway
        return gateway.coordinator.live_processes if gateway is not None else 1

    app.state.limits = limits = ClientLimits(settings, processes)
    app.state.key_usage = limits.snapshot
    request_metrics = RequestMetrics()
    app.state.registry = create_registry(
        lambda: app.state.gateway,
        request_metrics,
        KeyUsageCollector(limits),
        JobCollector(lambda: app.state.jobs),
    )
    app.router.routes.insert(0, users.hot_route)
    app.include_router(users.router)
    app.include_router(cache.router)
    app.include_router(jobs.router)
    app.include_router(monitoring.router)
    app.include_router(dashboard.router)
    install_docs(app)
    _install_error_handlers(app)
    # Our own body limit, not FastAPI's `max_body_size`: that one answers a declared
    # oversized Content-Length with a plain-text 413, and every error here is JSON.
    app.add_middleware(
        GatewayMiddleware,
        max_bytes=settings.max_body_bytes,
        large_bodies={"/api/jobs": settings.job_max_body_bytes},
        metrics=request_metrics,
        keys=keys,
        limits=limits,
        metrics_require_key=settings.metrics_require_key,
        access_log=settings.access_log,
    )
    customize_openapi(app, max_ids=settings.max_users_per_request, keys_on=not keys.open)
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
    if app.state.keys.open:
        log.warning(
            "no API_KEYS: the service is open to anyone who can reach %s (every caller "
            "may evict users and spend the Freelancer budget)",
            settings.host,
        )
    add_secrets(*_secret_values(settings))
    store: UserStore = app.state.store or create_store(settings)
    async with create_http_client(settings, transport) as http:
        clock: Clock = app.state.clock
        coordinator, budget = _coordination(settings)
        gateway = Gateway(
            settings=settings,
            store=store,
            upstream=FreelancerClient(http, base_url=base, clock=clock),
            coordinator=coordinator,
            budget=budget,
            clock=clock,
        )
        await gateway.start()
        app.state.gateway = gateway
        runner = JobRunner(gateway, create_job_store(settings, store), clock=clock)
        await runner.start()
        app.state.jobs = runner
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
            app.state.gateway = app.state.jobs = None
            await runner.stop()
            await gateway.stop()
            log.info("gateway stopped")


def _coordination(settings: Settings) -> tuple[Coordinator | None, Budget | None]:
    """Redis' coordinator and shared budget when REDIS_URL is set; else the in-process ones."""
    if settings.redis_url is None:
        return None, None
    from app.coordination.budget import RedisBudget
    from app.coordination.client import connect
    from app.coordination.coordinator import RedisCoordinator

    redis = connect(settings.redis_url.get_secret_value(), settings.redis_timeout_s)
    coordinator = RedisCoordinator(
        redis,
        prefix=settings.redis_prefix,
        lease_s=settings.flight_lease_s,
        timeout_s=settings.redis_timeout_s,
    )
    budget = RedisBudget(
        redis,
        budget_windows(settings),
        prefix=settings.redis_prefix,
        timeout_s=settings.redis_timeout_s,
        processes=lambda: coordinator.live_processes,
        min_processes=settings.workers,
    )
    return coordinator, budget


def _secret_values(settings: Settings) -> list[str | None]:
    """What must never be logged: the token, the MongoDB URL's password."""
    values: list[str | None] = []
    if settings.freelancer_oauth_token is not None:
        values.append(settings.freelancer_oauth_token.get_secret_value())
    for url in (settings.mongodb_url, settings.redis_url):
        if url is not None:
            values.append(httpx.URL(url.get_secret_value()).password)
    return values


def _json_error(
    status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
    )


def _install_error_handlers(app: FastAPI) -> None:
    """The one place errors become HTTP responses: JSON bodies, never a traceback."""

    async def gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return error_response(exc)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        problems = []
        for error in exc.errors()[:5]:
            loc = list(error.get("loc", ()))
            if loc and loc[0] in ("body", "path", "query", "header", "cookie"):
                loc = loc[1:]
            where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
            where = where.removeprefix(".")
            kind, msg = error.get("type"), str(error.get("msg", "invalid"))
            # Our validators' messages in our words: not pydantic's "Value error, ...".
            for prefix in ("Value error, ", "Assertion failed, "):
                msg = msg.removeprefix(prefix)
            if kind == "extra_forbidden":
                problems.append(f"unknown field {orjson.dumps(where).decode()}")
            elif kind == "json_invalid":
                problems.append("the body is not valid JSON")
            elif kind in ("model_attributes_type", "dict_type", "model_type") and not where:
                problems.append("the body must be a JSON object")
            elif kind == "missing" and not where:
                problems.append("a JSON body is required")
            else:
                problems.append(f"{where}: {msg}" if where else msg)
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


def __getattr__(name: str) -> Any:
    # `uvicorn app.main:app` reads `app` from here; building it lazily keeps importing this
    # module free of side effects (settings are read only when the app is asked for).
    if name == "app":
        settings = Settings()
        configure_logging(settings.log_level, force=False, fmt=settings.log_format)
        try:
            application = create_app(settings)
        except ConfigError as exc:
            log.error("%s", exc)
            raise SystemExit(2) from None
        globals()["app"] = application
        return application
    raise AttributeError(name)
