"""The application factory and its lifespan. `uvicorn app.main:app` serves `create_app()`."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from types import FrameType
from typing import Any
from urllib.parse import unquote

import httpx
from fastapi import FastAPI

from app import __version__
from app.clock import Clock, wall_clock
from app.config import Settings
from app.dashboard.hub import DashboardHub
from app.errors import ConfigError
from app.gateway import Gateway
from app.gateway.budget import Budget, budget_windows
from app.gateway.coordinator import Coordinator
from app.gateway.popularity import PopularityShare
from app.http.auth import KeyRing, load_keys
from app.http.client_limits import ClientLimits
from app.http.docs import install_docs
from app.http.errors import install_error_handlers
from app.http.fast_path import FastLookup
from app.http.local_only import LocalOnly, check_protected_mode, watch_listeners
from app.http.metrics import JobCollector, KeyUsageCollector, RequestMetrics, create_registry
from app.http.middleware import EdgeApp, GatewayMiddleware
from app.http.openapi import customize_openapi
from app.http.routers import cache, dashboard, jobs, monitoring, users
from app.http.routers.dashboard import encode_event
from app.http.state import Services
from app.jobs.runner import JobRunner
from app.jobs.store import create_job_store
from app.logs import configure_logging, masking
from app.store import UserStore, create_store
from app.upstream import FreelancerClient, create_http_client

log = logging.getLogger("app")

SIMULATOR_BASE = "http://simulator.invalid/api/users/0.1/users"

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
    fast_path: bool = True,
) -> FastAPI:
    """Build the app. Nothing is opened here: the lifespan opens the store, client and worker.

    `store` and `upstream_transport` replace the configured store and the HTTP transport
    to Freelancer, and `clock` the wall clock freshness is measured on (tests use them to
    fake the boundary and to step time). `fast_path=False` leaves every hot lookup to
    the FastAPI route (tests compare the two answers).
    """
    settings = settings or Settings()
    keys = KeyRing(load_keys(settings))
    check_protected_mode(settings, open_=keys.open)

    def processes() -> int:
        gateway = services.gateway
        return gateway.coordinator.live_processes if gateway is not None else 1

    limits = ClientLimits(settings, processes, key_names=keys.names)
    request_metrics = RequestMetrics()
    services = Services(
        settings=settings,
        keys=keys,
        limits=limits,
        registry=create_registry(
            lambda: services.gateway,
            request_metrics,
            KeyUsageCollector(limits),
            JobCollector(lambda: services.runner),
        ),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with _running(services, store=store, transport=upstream_transport, clock=clock):
            yield

    app = EdgeApp(
        title="Freelancer user-info gateway",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # app.http.docs serves /docs and /redoc with local assets
        redoc_url=None,
        # The gateway exports Prometheus metrics; FastAPI's OpenTelemetry instrumentation
        # would only ask, on every request, whether a provider is configured.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.services = services
    app.router.routes.insert(0, users.hot_route)
    app.include_router(users.router)
    app.include_router(cache.router)
    app.include_router(jobs.router)
    app.include_router(monitoring.router)
    app.include_router(dashboard.router)
    install_docs(app)
    install_error_handlers(app)
    # Our own body limit, not FastAPI's `max_body_size`: that one answers a declared
    # oversized Content-Length with a plain-text 413, and every error here is JSON.
    app.edge = GatewayMiddleware(
        app.inner(),
        max_bytes=settings.max_body_bytes,
        large_bodies={"/api/jobs": settings.job_max_body_bytes},
        metrics=request_metrics,
        keys=keys,
        limits=limits,
        metrics_require_key=settings.metrics_require_key,
        access_log=settings.access_log,
        local_only=LocalOnly(
            (settings.allowed_hosts or "").split(","), protect=not settings.auth_disabled
        ),
        trust_forwarded=bool((settings.forwarded_allow_ips or "").strip()),
        fast_lookup=FastLookup(services, users.hot_route) if fast_path else None,
    )
    customize_openapi(
        app,
        max_ids=settings.max_users_per_request,
        keys_on=not keys.open,
        callbacks_on=settings.webhook_secret is not None,
        job_max_ids=settings.job_max_ids,
    )
    return app


@asynccontextmanager
async def _running(
    services: Services,
    *,
    store: UserStore | None,
    transport: httpx.AsyncBaseTransport | None,
    clock: Clock,
) -> AsyncIterator[None]:
    """Start the gateway, the job runner and the dashboard hub; stop them in reverse order.

    Each part is registered on the exit stack as it starts, so a part that fails to start
    unwinds every part started before it, and nothing keeps running behind a failed start.
    """
    settings = services.settings
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
    if services.keys.open:
        log.warning(
            "no API_KEYS: every caller may evict users and spend the Freelancer budget; "
            "served only %sto Host names of this machine%s and to the gateway's own pages",
            "" if settings.auth_disabled else "on loopback addresses, ",
            " and ALLOWED_HOSTS" if settings.allowed_hosts else "",
        )
    async with AsyncExitStack() as stack:
        stack.enter_context(masking(_secret_values(settings)))
        if services.keys.open and not settings.auth_disabled:
            watch = asyncio.create_task(watch_listeners(), name="protected-mode-watch")
            stack.callback(watch.cancel)
        store = store or create_store(settings)
        http = await stack.enter_async_context(create_http_client(settings, transport))
        coordinator, budget = _coordination(settings)
        gateway = Gateway(
            settings=settings,
            store=store,
            upstream=FreelancerClient(http, base_url=base, clock=clock),
            coordinator=coordinator,
            budget=budget,
            popularity=_popularity(settings, coordinator),
            clock=clock,
        )
        stack.push_async_callback(gateway.stop)
        await gateway.start()
        runner = JobRunner(gateway, create_job_store(settings, store), clock=clock)
        stack.push_async_callback(runner.stop)
        await runner.start()
        hub = DashboardHub(gateway, runner, key_usage=services.limits.snapshot, encode=encode_event)
        stack.push_async_callback(hub.aclose)
        stack.enter_context(_on_exit_signal(hub.close))
        services.gateway, services.runner, services.dashboard = gateway, runner, hub
        stack.callback(services.detach)
        log.info(
            "gateway started: store=%s upstream=%s batch_size=%d concurrency=%d",
            store.kind,
            settings.upstream_kind,
            settings.batch_size,
            settings.upstream_concurrency,
        )
        yield
    log.info("gateway stopped")


@contextmanager
def _on_exit_signal(callback: Callable[[], None]) -> Iterator[None]:
    """Run `callback` on the loop as soon as the process is asked to exit (SIGTERM, SIGINT),
    then whatever handled the signal before (the server's own shutdown).

    A server waits for open responses to finish before it runs the lifespan's shutdown, so
    long-lived streams must end on the signal itself. The handler wraps whatever was
    installed; it reads nothing of the server's. Only the main thread may set handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(sig: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(callback)
        before = previous[signal.Signals(sig)]
        if callable(before):
            before(sig, frame)
        elif before == signal.SIG_DFL:  # what would have happened without us
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, before in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, before)


def _coordination(settings: Settings) -> tuple[Coordinator | None, Budget | None]:
    """Redis' coordinator and shared budget when REDIS_URL is set; else the in-process ones."""
    if settings.redis_url is None:
        return None, None
    from app.coordination.client import connect
    from app.coordination.redis_budget import RedisBudget
    from app.coordination.redis_coordinator import RedisCoordinator

    redis = connect(settings.redis_url.get_secret_value(), settings.redis_timeout_s)
    coordinator = RedisCoordinator(
        redis,
        prefix=settings.redis_prefix,
        lease_s=settings.flight_lease_s,
        timeout_s=settings.redis_timeout_s,
        not_found_ttl_s=settings.not_found_ttl_s,
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


def _popularity(settings: Settings, coordinator: Coordinator | None) -> PopularityShare | None:
    """Every process's popularity counts merged through Redis, when coordinated."""
    from app.coordination.popularity_sync import RedisPopularity
    from app.coordination.redis_coordinator import RedisCoordinator

    if not isinstance(coordinator, RedisCoordinator):
        return None
    return RedisPopularity(
        coordinator.redis,
        prefix=settings.redis_prefix,
        process=coordinator.process,
        timeout_s=settings.redis_timeout_s,
        leads=coordinator.leads,
    )


def _secret_values(settings: Settings) -> list[str | None]:
    """What must never be logged: the token, and the MongoDB and Redis URLs' passwords as
    written and decoded (a driver may quote either)."""
    values: list[str | None] = []
    if settings.freelancer_oauth_token is not None:
        values.append(settings.freelancer_oauth_token.get_secret_value())
    for url in (settings.mongodb_url, settings.redis_url):
        if url is not None:
            values += url_passwords(url.get_secret_value())
    return values


def url_passwords(url: str) -> list[str]:
    """The password in a URL's user information, as written and percent-decoded. Read by
    hand: a MongoDB URL may name several hosts, which URL parsers refuse."""
    _, sep, rest = url.partition("://")
    userinfo = rest.split("/", 1)[0].rpartition("@")[0] if sep else ""
    _, has_password, password = userinfo.partition(":")
    if not has_password or not password:
        return []
    return list(dict.fromkeys((password, unquote(password))))


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
