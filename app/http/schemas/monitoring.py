"""What the monitoring routes answer: health, the queue, counters, budget windows, jobs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class BudgetWindow(BaseModel):
    """One of Freelancer's limits, from the log of calls (every process's): calls allowed
    per period, used in the last period (and margin), left, and when a client's miss may
    call next."""

    name: str = Field(examples=["minute"])
    limit: int
    period_s: float = Field(description="Freelancer's period")
    margin_s: float = Field(description="UPSTREAM_WINDOW_MARGIN_S: counted on top of the period")
    used: int = Field(description="Calls in the last period_s + margin_s")
    remaining: int = Field(description="limit - used")
    next_call_in_s: float = Field(description="Seconds until a client's miss may call (0: now)")


class LaneWaiting(BaseModel):
    """A budget lane with ids queued that is not calling now, and why (the planner's view)."""

    lane: Literal["misses", "jobs", "refreshes"]
    waits_for: str = Field(
        description='"minute" or "hour" (that window is full, or holds the reserve a '
        'background lane leaves to clients), "pace" (jobs and refreshes keep to the hourly '
        'rate), "pause" (Freelancer said 429), or "behind <lane>" (that lane took the call)',
        examples=["minute"],
    )
    in_s: float = Field(description="Seconds until it may call, as far as is known now")


class JobStats(BaseModel):
    """Crawl jobs: how many in each status, and what the runner did since start."""

    by_status: dict[str, int]
    ids_done: int = Field(description="Job ids this process recorded as done since start")
    upstream_calls: int = Field(description="Upstream calls job ids went out in")
    running_here: bool = Field(description="This process runs the deployment's jobs")


class RefreshAheadState(BaseModel):
    """Refresh-ahead's reach: of the popular users, how many are kept fresh."""

    enabled: bool
    popular: int = Field(description="Users asked for at least REFRESH_AHEAD_MIN_HITS a TTL")
    covered: int = Field(description="Of them, fresh or being refreshed")
    coverage: float = Field(description="covered / popular (1.0 when none are popular)")


class Health(BaseModel):
    message: str = "Freelancer user-info gateway is running"
    status: Literal["healthy", "degraded"]
    problems: list[str]
    queue_size: int
    processing_count: int
    store: Literal["sqlite", "mongodb"]
    upstream: Literal["freelancer", "simulator"]
    upstream_state: Literal["ok", "throttled", "open"]
    auth: Literal["open", "keys"] = Field(
        description="open: no API_KEYS, anyone who can reach the service may call it"
    )
    coordination: Literal["local", "redis"] = Field(
        description="redis: the processes of the deployment share fetches, budget and cache"
    )
    processes: int = Field(description="Processes of the deployment seen alive lately")
    refresh_ahead: RefreshAheadState = Field(
        description="Popular users kept fresh (as the leading process last saw)"
    )
    budget: list[BudgetWindow] = Field(description="Freelancer's minute and hour windows")
    budget_waiting: list[LaneWaiting] = Field(description="Lanes waiting for the budget, and why")


class QueueInfo(BaseModel):
    queue_size: int
    processing_count: int
    currently_processing: list[int] = Field(description="Ids in flight (at most 1000 listed)")
    queue_limit: int


class KeyUsage(BaseModel):
    """What one client did since start, by its key's name (the IP address when open)."""

    name: str
    requests: int
    ids: int
    misses: int = Field(description="New ids it sent to Freelancer")
    refused: int = Field(description="Requests answered 429")
    over_quota: int = Field(description="New ids answered unavailable, reason quota")


class Stats(BaseModel):
    """Counters since start, and the cache's size."""

    store: Literal["sqlite", "mongodb"]
    total_users_cached: int | None = Field(description="Users in the store; null if unreachable")
    memory_cache_size: int
    queue_size: int
    processing_count: int
    upstream_state: Literal["ok", "throttled", "open"]
    requests: int
    ids_requested: int
    cache_hits: int
    stale_hits: int
    cache_misses: int
    fetched: int
    coalesced: int
    not_found: int
    negative_hits: int
    unavailable: int
    unavailable_reasons: dict[str, int]
    upstream_calls: int
    upstream_users_fetched: int
    upstream_ids_requested: int
    upstream_errors: int
    upstream_retries: int
    batches: int
    job_batches: int
    refreshes_queued: int
    refresh_ahead_calls: int = Field(description="Calls that refreshed popular users ahead")
    refresh_ahead_ids: int = Field(description="Popular users refreshed before turning stale")
    stale_popular: int = Field(description="Stale answers of users in the popular set")
    stale_other: int = Field(description="Stale answers of other users")
    shed: int
    store_errors: int
    store_save_failures: int
    worker_restarts: int
    keys: list[KeyUsage] = Field(description="Usage per client")
    budget: list[BudgetWindow] = Field(description="Freelancer's minute and hour windows")
    budget_waiting: list[LaneWaiting] = Field(description="Lanes waiting for the budget, and why")
    jobs: JobStats | None = Field(description="Crawl jobs; null while the runner is down")
