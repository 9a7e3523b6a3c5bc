"""Counters since start, read by `/api/stats` and exported to Prometheus at scrape time."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field, fields
from typing import Any

LATENCY_SAMPLES = 1000


@dataclass(slots=True)
class GatewayStats:
    """Plain integer counters: incrementing one costs the hot path nothing measurable."""

    requests: int = 0
    ids_requested: int = 0
    cache_hits: int = 0
    stale_hits: int = 0
    cache_misses: int = 0
    fetched: int = 0
    coalesced: int = 0
    not_found: int = 0
    negative_hits: int = 0
    unavailable: int = 0
    unavailable_reasons: Counter[str] = field(default_factory=Counter)
    upstream_calls: int = 0
    upstream_users_fetched: int = 0
    upstream_ids_requested: int = 0
    upstream_errors: int = 0
    upstream_retries: int = 0
    batches: int = 0
    """Batches sent upstream (counted as they go, beside `job_batches`; retries not)."""
    job_batches: int = 0
    """Batches that held only crawl jobs' ids (every other call served a client too)."""
    refreshes_queued: int = 0
    refresh_ahead_calls: int = 0
    """Upstream calls that carried refresh-ahead ids (counted as they go)."""
    refresh_ahead_ids: int = 0
    """Ids refreshed ahead of turning stale (sent upstream)."""
    stale_popular: int = 0
    """Stale answers of ids in the popular set (refresh-ahead should keep this at 0)."""
    stale_other: int = 0
    """Stale answers of other ids."""
    shed: int = 0
    store_errors: int = 0
    store_save_failures: int = 0
    worker_restarts: int = 0
    upstream_latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    """Seconds taken by the last LATENCY_SAMPLES successful upstream calls (the dashboard's
    p50/p95); not a counter, so not in `snapshot()`."""

    def snapshot(self) -> dict[str, Any]:
        """All counters as a JSON-ready dict."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        del data["upstream_latencies"]
        data["unavailable_reasons"] = dict(self.unavailable_reasons)
        return data
