"""Per-second samples of the gateway's counters, for the live dashboard (`/api/events`).

`RateSampler.sample` is called once a second (by `app.http.routers.dashboard`, only while a
dashboard is open). It turns the cumulative counters of `GatewayStats` into rates over the
interval since the previous sample, reads the gauges (queue, in flight, breaker, budget),
and keeps the last HISTORY_S chart points. Nothing here awaits or starts a task.

Refresh-ahead's calls and ids and the stale answers served (popular users and others
apart) are totals since start, as `GatewayStats` counts them.

The budget comes from the budget's own log (every process's calls in each window, whether
or not a dashboard was open), with the lanes that wait for it and why (the planner's).

Crawl jobs come in as `JobsNow` (gathered by the caller, which reads the job store): the
sample's `jobs` object adds the rate of job ids done; it is null when no runner exists.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.gateway.health import upstream_state

if TYPE_CHECKING:
    from app.gateway.gateway import Gateway

HISTORY_S = 600
"""Chart points kept: ten minutes of one-second samples."""
GAP_S = 5.0
"""A sample further than this from the previous one (no dashboard was open in between)
starts afresh: its rates are null rather than averaged over the gap."""
POINT_FIELDS = (
    "t",
    "requests_per_s",
    "ids_per_s",
    "coalesced_per_s",
    "hit_ratio",
    "upstream_calls_per_s",
    "latency_p50_ms",
    "latency_p95_ms",
    "queue",
    "in_flight",
)
"""The fields of a sample that the charts plot; a history point has exactly these."""


@dataclass(frozen=True, slots=True)
class JobsNow:
    """The job runner's numbers at one instant, as the caller gathered them."""

    by_status: Mapping[str, int]
    ids_done: int
    """Job ids done since the runner started (cumulative)."""
    active: Sequence[Mapping[str, Any]] | None = ()
    """Up to a few active jobs, each ready for JSON (None: the job store not read yet)."""
    active_total: int | None = None
    """Every active job (the list may show fewer); None: not read yet."""


@dataclass(slots=True)
class _Totals:
    """Cumulative counters at one instant."""

    at: float
    requests: int
    ids: int
    hits: int
    misses: int
    coalesced: int
    upstream_calls: int
    jobs_done: int


def percentile(ordered: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile of an ascending sequence; None when it is empty."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _per_s(delta: int, seconds: float) -> float | None:
    return round(delta / seconds, 2) if seconds > 0 else None


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole > 0 else None


def _refresh_ahead(gateway: Gateway) -> dict[str, Any]:
    """Refresh-ahead's work since start, and the stale answers it exists to avoid: of the
    popular set, and of other users, apart (`GatewayStats`)."""
    stats, loop = gateway.stats, gateway.refresh_ahead
    coverage = loop.coverage
    return {
        "enabled": loop.enabled,
        "calls_total": stats.refresh_ahead_calls,
        "ids_total": stats.refresh_ahead_ids,
        "stale_popular_total": stats.stale_popular,
        "stale_other_total": stats.stale_other,
        "popular": coverage.popular,
        "coverage": coverage.ratio,
    }


class RateSampler:
    """Rates since the previous sample, gauges now, and the last `history` chart points."""

    def __init__(
        self,
        *,
        history: int = HISTORY_S,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.points: deque[dict[str, Any]] = deque(maxlen=history)
        self.seq = 0
        self._clock = clock
        self._wall = wall
        self._last: _Totals | None = None
        self._key_requests: dict[str, int] = {}

    def sample(
        self,
        gateway: Gateway,
        *,
        store_size: int | None,
        key_usage: Iterable[Mapping[str, Any]] = (),
        jobs: JobsNow | None = None,
    ) -> dict[str, Any]:
        """One sample (JSON-ready); its chart point is appended to `points`."""
        stats = gateway.stats
        now = self._clock()
        totals = _Totals(
            at=now,
            requests=stats.requests,
            ids=stats.ids_requested,
            hits=stats.cache_hits + stats.stale_hits + stats.negative_hits,
            misses=stats.cache_misses,
            coalesced=stats.coalesced,
            upstream_calls=stats.upstream_calls,
            jobs_done=jobs.ids_done if jobs is not None else 0,
        )
        last = self._last
        if last is None or totals.at - last.at > GAP_S:
            last = totals
        seconds = totals.at - last.at
        self._last = totals
        self.seq += 1

        calls = totals.upstream_calls - last.upstream_calls
        windows = gateway.budget.windows()
        used = {w.name: w.used for w in windows}
        latencies = sorted(stats.upstream_latencies)
        hits = totals.hits - last.hits
        looked_up = hits + totals.misses - last.misses
        sample: dict[str, Any] = {
            "seq": self.seq,
            "t": round(self._wall(), 3),
            "interval_s": round(seconds, 3),
            "requests_per_s": _per_s(totals.requests - last.requests, seconds),
            "ids_per_s": _per_s(totals.ids - last.ids, seconds),
            "coalesced_per_s": _per_s(totals.coalesced - last.coalesced, seconds),
            "hit_ratio": _ratio(hits, looked_up),
            "requests_total": totals.requests,
            "ids_total": totals.ids,
            "coalesced_total": totals.coalesced,
            "hit_ratio_total": _ratio(totals.hits, totals.hits + totals.misses),
            "queue": gateway.queue.qsize(),
            "queue_limit": gateway.settings.queue_max,
            "in_flight": gateway.processing_count,
            "upstream_calls_per_s": _per_s(calls, seconds),
            "upstream_calls_total": totals.upstream_calls,
            "upstream_errors_total": stats.upstream_errors,
            "upstream_calls_last_minute": used.get("minute"),
            "upstream_calls_last_hour": used.get("hour"),
            "latency_p50_ms": _ms(percentile(latencies, 0.50)),
            "latency_p95_ms": _ms(percentile(latencies, 0.95)),
            "latency_samples": len(latencies),
            "upstream_state": upstream_state(gateway),
            "breaker": gateway.breaker.state,
            "throttled": gateway.budget.throttled,
            "throttle_wait_s": round(gateway.budget.wait_s(), 2),
            "budget": [
                {
                    "name": w.name,
                    "period_s": w.period_s,
                    "margin_s": w.margin_s,
                    "limit": w.limit,
                    "used": w.used,
                    "remaining": w.remaining,
                    "next_call_in_s": round(w.next_call_in_s, 1),
                }
                for w in windows
            ],
            "budget_waiting": [
                {"lane": w.lane, "waits_for": w.waits_for, "in_s": round(w.in_s, 1)}
                for w in gateway.planner.waiting()
            ],
            "store": gateway.store.kind,
            "store_size": store_size,
            "memory_size": len(gateway.memory),
            "refresh_ahead": _refresh_ahead(gateway),
            "keys": self._keys(key_usage, seconds),
            "jobs": None,
        }
        if jobs is not None:
            # A new runner (the app restarted) counts from 0 again: no negative rate.
            done = max(0, totals.jobs_done - last.jobs_done)
            sample["jobs"] = {
                "by_status": dict(jobs.by_status),
                "ids_done_per_s": _per_s(done, seconds),
                "active": None if jobs.active is None else [dict(job) for job in jobs.active],
                "active_total": jobs.active_total,
            }
        self.points.append({name: sample[name] for name in POINT_FIELDS})
        return sample

    def _keys(self, usage: Iterable[Mapping[str, Any]], seconds: float) -> list[dict[str, Any]]:
        """Each key's counters, and its requests a second since the previous sample."""
        keys = []
        seen: dict[str, int] = {}
        for entry in usage:
            name = str(entry.get("name", "?"))
            requests = int(entry.get("requests", 0))
            before = self._key_requests.get(name, requests)
            seen[name] = requests
            keys.append(
                {
                    "name": name,
                    "requests": requests,
                    "ids": int(entry.get("ids", 0)),
                    "misses": int(entry.get("misses", 0)),
                    "requests_per_s": _per_s(requests - before, seconds),
                }
            )
        self._key_requests = seen
        return keys
