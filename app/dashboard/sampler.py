"""Per-second samples of the gateway's counters, for the live dashboard (`/api/events`).

`RateSampler.sample` is called once a second (by `app.http.routers.dashboard`, only while a
dashboard is open). It turns the cumulative counters of `GatewayStats` into rates over the
interval since the previous sample, reads the gauges (queue, in flight, breaker, budget),
and keeps the last HISTORY_S chart points. Nothing here awaits or starts a task.

Upstream calls per window are counted from `stats.upstream_calls` deltas seen by this
sampler: while no dashboard was open nothing was seen, so each window says how many of
its seconds it covers (`covered_s`).

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
MAX_WINDOW_S = 3600.0
"""The longest span upstream calls are counted over (a longer budget window counts its
last hour only, and says so in `covered_s`)."""
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
    active: Sequence[Mapping[str, Any]] = ()
    """Up to a few active jobs, each ready for JSON."""


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


class CallWindow:
    """Upstream calls seen over the last `period_s`, and how much of it was observed."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self.calls = 0
        self.covered_s = 0.0
        self._spans: deque[tuple[float, int, float]] = deque()  # (end, calls, seconds)

    def add(self, end: float, calls: int, seconds: float) -> None:
        """`calls` were made in the `seconds` that ended at `end` (monotonic)."""
        self._spans.append((end, calls, seconds))
        self.calls += calls
        self.covered_s += seconds
        start = end - self.period_s
        while self._spans and self._spans[0][0] <= start:
            _, old_calls, old_seconds = self._spans.popleft()
            self.calls -= old_calls
            self.covered_s -= old_seconds
        self.covered_s = max(0.0, self.covered_s)


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
        self._windows: dict[float, CallWindow] = {}
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
        periods = {60.0, MAX_WINDOW_S, *(min(w.period_s, MAX_WINDOW_S) for w in windows)}
        for period in periods:
            self._windows.setdefault(period, CallWindow(period))
        for window in self._windows.values():
            window.add(now, calls, seconds)

        latencies = sorted(stats.upstream_latencies)
        hits = totals.hits - last.hits
        looked_up = hits + totals.misses - last.misses
        minute, hour = self._windows[60.0], self._windows[MAX_WINDOW_S]
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
            "upstream_calls_last_minute": minute.calls,
            "upstream_calls_last_hour": hour.calls,
            "upstream_minute_covered_s": round(minute.covered_s),
            "upstream_hour_covered_s": round(hour.covered_s),
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
                    "limit": w.limit,
                    "remaining": w.remaining,
                    "used": self._windows[min(w.period_s, MAX_WINDOW_S)].calls,
                    "covered_s": round(self._windows[min(w.period_s, MAX_WINDOW_S)].covered_s),
                }
                for w in windows
            ],
            "store": gateway.store.kind,
            "store_size": store_size,
            "memory_size": len(gateway.memory),
            "keys": self._keys(key_usage, seconds),
            "jobs": None,
        }
        if jobs is not None:
            # A new runner (the app restarted) counts from 0 again: no negative rate.
            done = max(0, totals.jobs_done - last.jobs_done)
            sample["jobs"] = {
                "by_status": dict(jobs.by_status),
                "ids_done_per_s": _per_s(done, seconds),
                "active": [dict(job) for job in jobs.active],
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
