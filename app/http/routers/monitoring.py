"""Health, queue and stats for operators, and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.errors import StoreUnavailable
from app.gateway import Gateway
from app.gateway import health as gateway_health
from app.http.dependencies import GatewayDep, ServicesDep
from app.http.schemas.common import ErrorResponse
from app.http.schemas.monitoring import (
    BudgetWindow,
    Health,
    JobStats,
    LaneWaiting,
    QueueInfo,
    RefreshAheadState,
    Stats,
)
from app.jobs.runner import JobRunner

router = APIRouter(tags=["monitoring"])


@router.get("/", response_model=Health, summary="Health")
async def health(services: ServicesDep, gateway: GatewayDep) -> Health:
    """Whether the service is healthy, which store and upstream it uses, and its queue."""
    problems = gateway_health.problems(gateway)
    return Health(
        status="degraded" if problems else "healthy",
        problems=problems,
        queue_size=gateway.queue.qsize(),
        processing_count=gateway.processing_count,
        store=gateway.store.kind,
        upstream=gateway.settings.upstream_kind,
        upstream_state=gateway_health.upstream_state(gateway),
        auth="open" if services.keys.open else "keys",
        coordination=gateway.coordinator.kind,
        processes=gateway.coordinator.live_processes,
        refresh_ahead=refresh_ahead_state(gateway),
        budget=await budget_windows(gateway, ask=False),
        budget_waiting=budget_waiting(gateway),
    )


@router.get("/healthz", summary="Liveness", response_model=dict[str, str])
async def liveness() -> dict[str, str]:
    """200 while the process serves HTTP."""
    return {"status": "alive"}


@router.get(
    "/readyz",
    summary="Readiness",
    response_model=dict[str, str],
    responses={503: {"model": ErrorResponse}},
)
async def readiness(gateway: GatewayDep) -> dict[str, str]:
    """200 when the store answers; 503 naming the store's setting when it does not."""
    try:
        await gateway.store.ping()
    except StoreUnavailable:
        gateway.writes.store_ready = False
        raise
    gateway.writes.store_ready = True
    return {"status": "ready"}


@router.get("/api/queue", response_model=QueueInfo, summary="Queue")
async def queue(gateway: GatewayDep) -> QueueInfo:
    """Ids queued and in flight."""
    return QueueInfo(
        queue_size=gateway.queue.qsize(),
        processing_count=gateway.processing_count,
        currently_processing=gateway.processing_ids(),
        queue_limit=gateway.settings.queue_max,
    )


@router.get("/api/stats", response_model=Stats, summary="Statistics")
async def stats(services: ServicesDep, gateway: GatewayDep) -> Stats:
    """Counters since start and the size of the cache."""
    try:
        total: int | None = await gateway.store.count()
    except StoreUnavailable:
        total = None
    return Stats(
        store=gateway.store.kind,
        total_users_cached=total,
        memory_cache_size=len(gateway.memory),
        queue_size=gateway.queue.qsize(),
        processing_count=gateway.processing_count,
        upstream_state=gateway_health.upstream_state(gateway),
        keys=services.limits.snapshot(),
        budget=await budget_windows(gateway),
        budget_waiting=budget_waiting(gateway),
        jobs=job_stats(services.runner),
        **gateway.stats.snapshot(),
    )


async def budget_windows(gateway: Gateway, *, ask: bool = True) -> list[BudgetWindow]:
    """Each budget window: as it stands now (a shared budget is asked first), or, for the
    health check, as last seen (no round trip to Redis)."""
    if ask:
        await gateway.budget.refresh()
    return [BudgetWindow.model_validate(w, from_attributes=True) for w in gateway.budget.windows()]


def refresh_ahead_state(gateway: Gateway) -> RefreshAheadState:
    coverage = gateway.refresh_ahead.coverage
    return RefreshAheadState(
        enabled=gateway.refresh_ahead.enabled,
        popular=coverage.popular,
        covered=coverage.covered,
        coverage=coverage.ratio,
    )


def budget_waiting(gateway: Gateway) -> list[LaneWaiting]:
    """The lanes waiting for the budget, and why (the planner's last decision, aged)."""
    waiting = gateway.planner.waiting()
    return [LaneWaiting.model_validate(w, from_attributes=True) for w in waiting]


def job_stats(runner: JobRunner | None) -> JobStats | None:
    if runner is None:
        return None
    return JobStats(
        by_status=runner.by_status,
        ids_done=runner.ids_done,
        upstream_calls=runner.upstream_calls,
        running_here=runner.gateway.coordinator.leads(),
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics(services: ServicesDep) -> Response:
    """The gateway's counters and request latencies in Prometheus' text format."""
    return Response(generate_latest(services.registry), media_type=CONTENT_TYPE_LATEST)
