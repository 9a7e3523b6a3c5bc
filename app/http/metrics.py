"""Prometheus metrics, read from the gateway's counters at scrape time (free on the hot path)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from app.gateway import Gateway, health
from app.http.client_limits import ClientLimits
from app.jobs.model import STATUSES
from app.jobs.runner import JobRunner

COUNTERS = {
    "requests": "User lookup requests served.",
    "ids_requested": "Ids asked for, after folding duplicates.",
    "cache_hits": "Ids answered fresh from memory or the store.",
    "stale_hits": "Ids answered with a stale copy while a refresh runs.",
    "cache_misses": "Ids that needed Freelancer.",
    "fetched": "Ids whose fetch a request started.",
    "coalesced": "Ids that joined a fetch already in flight.",
    "not_found": "Ids answered as not existing.",
    "negative_hits": "Ids answered not found from the negative cache.",
    "unavailable": "Ids answered unavailable.",
    "upstream_calls": "HTTP calls to Freelancer.",
    "upstream_users_fetched": "Users Freelancer returned.",
    "upstream_ids_requested": "Ids sent to Freelancer.",
    "upstream_errors": "Failed calls to Freelancer.",
    "upstream_retries": "Retried calls to Freelancer.",
    "batches": "Batches sent to Freelancer (each retried call counts once).",
    "job_batches": "Batches that held only crawl jobs' ids.",
    "refreshes_queued": "Background refreshes queued.",
    "refresh_ahead_calls": "Calls to Freelancer that refreshed popular users ahead of time.",
    "refresh_ahead_ids": "Popular users refreshed before they turned stale.",
    "stale_popular": "Stale answers of users in the popular set.",
    "stale_other": "Stale answers of other users.",
    "shed": "Requests refused with 503 because a bound was hit.",
    "store_errors": "Store reads that failed.",
    "store_save_failures": "Store saves that failed.",
    "worker_restarts": "Times the fetch worker was restarted.",
}


class GatewayCollector(Collector):
    """Exports the gateway's counters and gauges under `gateway_`."""

    def __init__(self, gateway: Callable[[], Gateway | None]) -> None:
        self._gateway = gateway

    def collect(self) -> Iterator[Metric]:
        gateway = self._gateway()
        if gateway is None:
            return
        stats = gateway.stats
        for name, doc in COUNTERS.items():
            yield CounterMetricFamily(f"gateway_{name}", doc, value=getattr(stats, name))
        yield CounterMetricFamily(
            "gateway_coordination_round_trips",
            "Round trips to the coordinator (Redis) made for lookups; 0 when local.",
            value=gateway.coordinator.round_trips,
        )
        reasons = CounterMetricFamily(
            "gateway_unavailable_by_reason",
            "Ids answered unavailable, by reason.",
            labels=["reason"],
        )
        for reason, count in stats.unavailable_reasons.items():
            reasons.add_metric([reason], count)
        yield reasons
        for name, doc, value in (
            ("queue_size", "Ids waiting for the worker.", gateway.queue.qsize()),
            ("processing", "Ids with a fetch in flight.", gateway.processing_count),
            ("memory_cache_users", "Users in the in-memory LRU.", len(gateway.memory)),
            (
                "store_unsaved",
                "Users fetched and not yet saved to the store.",
                gateway.writes.backlog,
            ),
            ("healthy", "1 when healthy, 0 when degraded.", 0 if health.problems(gateway) else 1),
            (
                "processes",
                "Processes of the deployment seen alive.",
                gateway.coordinator.live_processes,
            ),
            (
                "popular_users",
                "Users asked for at least REFRESH_AHEAD_MIN_HITS times per CACHE_TTL_S.",
                gateway.refresh_ahead.coverage.popular,
            ),
            (
                "popular_users_fresh",
                "Popular users with a fresh copy or a refresh under way.",
                gateway.refresh_ahead.coverage.covered,
            ),
        ):
            yield GaugeMetricFamily(f"gateway_{name}", doc, value=value)
        state = GaugeMetricFamily(
            "gateway_upstream_state", "1 for the upstream's current state.", labels=["state"]
        )
        upstream_state = health.upstream_state(gateway)
        for name in ("ok", "throttled", "open"):
            state.add_metric([name], 1 if upstream_state == name else 0)
        yield state
        yield from budget_metrics(gateway)


def budget_metrics(gateway: Gateway) -> Iterator[Metric]:
    """Each budget window from the log (every process's calls, as of the last read: the
    gateway reads a shared log every 2 s), and the lanes waiting for it."""
    windows = gateway.budget.windows()
    for field, name, doc in (
        ("limit", "limit", "Calls Freelancer allows per window."),
        ("used", "used", "Calls in the window's last period and margin, every process's."),
        ("remaining", "remaining", "Calls left in each window now."),
        ("next_call_in_s", "next_call_in_seconds", "Seconds until a client's miss may call."),
    ):
        family = GaugeMetricFamily(f"gateway_budget_{name}", doc, labels=["window"])
        for window in windows:
            family.add_metric([window.name], getattr(window, field))
        yield family
    waiting = GaugeMetricFamily(
        "gateway_budget_lane_waiting_seconds",
        "Lanes with ids queued that may not call yet: seconds to wait, by what holds them.",
        labels=["lane", "waits_for"],
    )
    for lane in gateway.planner.waiting():
        waiting.add_metric([lane.lane, lane.waits_for], lane.in_s)
    yield waiting


class JobCollector(Collector):
    """Crawl jobs under `gateway_jobs_`: jobs by status, ids done, upstream calls."""

    def __init__(self, runner: Callable[[], JobRunner | None]) -> None:
        self._runner = runner

    def collect(self) -> Iterator[Metric]:
        runner = self._runner()
        if runner is None:
            return
        family = GaugeMetricFamily("gateway_jobs", "Jobs by status.", labels=["status"])
        for status in STATUSES:
            family.add_metric([status], runner.by_status.get(status, 0))
        yield family
        yield CounterMetricFamily(
            "gateway_job_ids_done", "Job ids recorded done by this process.", runner.ids_done
        )
        yield CounterMetricFamily(
            "gateway_job_upstream_calls",
            "Upstream calls job ids went out in.",
            runner.upstream_calls,
        )


def create_registry(
    gateway: Callable[[], Gateway | None], *collectors: Collector
) -> CollectorRegistry:
    """A registry of this app's own (not the process-global one, so apps can coexist)."""
    registry = CollectorRegistry()
    registry.register(GatewayCollector(gateway))
    for collector in collectors:
        registry.register(collector)
    return registry


class KeyUsageCollector(Collector):
    """Per-client usage under `gateway_key_`, labelled by the key's name (never the key), or
    `ip:*` for every client named by its address."""

    def __init__(self, limits: ClientLimits) -> None:
        self._limits = limits

    def collect(self) -> Iterator[Metric]:
        usage = self._limits.by_label()
        for field, doc in (
            ("requests", "API requests by client."),
            ("ids", "Ids looked up by client."),
            ("misses", "New ids a client sent to Freelancer."),
            ("refused", "Requests answered 429 by client."),
            ("over_quota", "New ids answered unavailable (quota) by client."),
        ):
            family = CounterMetricFamily(f"gateway_key_{field}", doc, labels=["key"])
            for row in usage:
                family.add_metric([row["name"]], row[field])
            yield family


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RequestMetrics(Collector):
    """Request latencies by method, route template and status, as a Prometheus histogram.

    Each label set holds a list of bucket counts and a sum, updated in place; the event
    loop is the only writer, so no lock is needed.
    """

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, int], list[float]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one request."""
        if method not in METHODS:  # the client picks it: no label of its choosing
            method = "other"
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
