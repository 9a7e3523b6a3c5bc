"""`ResilientUpstream`: retries, backoff, the budget and the breaker around an `Upstream`."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence

from app.config import Settings
from app.errors import UpstreamAuthError, UpstreamCircuitOpen, UpstreamError, UpstreamRateLimited
from app.gateway.breaker import CircuitBreaker
from app.gateway.budget import MISSES, Budget
from app.gateway.planner import Planner
from app.gateway.stats import GatewayStats
from app.upstream.base import Upstream, UpstreamBatch

log = logging.getLogger("app.gateway")

MAX_BACKOFF_S = 10.0


def backoff_s(attempt: int, base: float) -> float:
    """Exponential backoff with full jitter for the `attempt`-th retry (1-based)."""
    return random.uniform(0, min(MAX_BACKOFF_S, base * 2 ** (attempt - 1)))


class Slot:
    """One of the worker's UPSTREAM_CONCURRENCY places, held by a batch while it calls.

    Given up while a retry waits (its backoff, or the budget for its lane) and taken again
    before the call: a crawl's retry waiting out the jobs' reserve must not keep a client's
    miss from the calls the window still has for it.
    """

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots = slots
        self._held = True  # made once the worker acquired it

    def release(self) -> None:
        """Give the place back (once; again after `take`)."""
        if self._held:
            self._held = False
            self._slots.release()

    async def take(self) -> None:
        """Hold a place again, waiting for one if need be."""
        if not self._held:
            await self._slots.acquire()
            self._held = True


class ResilientUpstream:
    """An `Upstream` that wraps another, as httpx transports wrap transports.

    Each call spends one call of the budget in its batch's lane (the first is usually
    spent by the worker before it gathered the batch: `ticket`), asks the breaker, has the
    budget log it at the moment it is sent (`stamp`), and is
    retried with backoff and jitter while the failure is retryable, each retry spending
    again in the same lane (a 429 pauses the whole budget instead of sleeping here).
    401/403 are not retried and set `auth_failed` until a call succeeds. Raises the last
    `UpstreamError`, or `UpstreamCircuitOpen` when no call was allowed (a spent call that
    the breaker stops is refunded).
    """

    def __init__(
        self,
        upstream: Upstream,
        planner: Planner,
        *,
        breaker: CircuitBreaker,
        stats: GatewayStats,
        settings: Settings,
    ) -> None:
        self.upstream = upstream
        self.budget: Budget = planner.budget
        self.planner = planner
        self.breaker = breaker
        self.stats = stats
        self.max_attempts = settings.upstream_max_attempts
        self.backoff_base_s = settings.upstream_backoff_s
        self.auth_failed = False

    async def fetch_users(
        self,
        user_ids: Sequence[int],
        lane: str = MISSES,
        ticket: str | None = None,
        slot: Slot | None = None,
    ) -> UpstreamBatch:
        """One batch call in `lane`, retried with backoff; raises the last UpstreamError.
        No ids (other processes fetch them all): no call, and a spent `ticket` given back.
        A retry gives `slot` up while it waits and takes it again before it calls."""
        if not user_ids:
            if ticket is not None:
                await self.budget.refund(ticket)
            return UpstreamBatch({})
        attempt = 0
        while True:
            attempt += 1
            if ticket is None:  # no call leaves without one: the breaker is asked after
                if self.breaker.rejecting:
                    raise UpstreamCircuitOpen("Freelancer is failing; not calling it for a while")
                ticket = await self.planner.acquire(lane)
                if slot is not None:
                    await slot.take()
            if not self.breaker.allow_call():
                await self.budget.refund(ticket)
                raise UpstreamCircuitOpen("Freelancer is failing; not calling it for a while")
            # Logged from now, not from its grant (see app.gateway.budget: the margin).
            await self.budget.stamp(ticket, lane)
            ticket = None  # spent: a retry spends again
            self.stats.upstream_calls += 1
            self.stats.upstream_ids_requested += len(user_ids)
            started = time.perf_counter()
            try:
                batch = await self.upstream.fetch_users(user_ids)
            except UpstreamError as exc:
                await self._failed(exc)
                if not exc.retryable or attempt >= self.max_attempts:
                    raise
                self.stats.upstream_retries += 1
                log.info("retrying batch of %d ids after: %s", len(user_ids), exc.message)
                if slot is not None:
                    slot.release()
                if not isinstance(exc, UpstreamRateLimited):
                    await asyncio.sleep(backoff_s(attempt, self.backoff_base_s))
                continue
            self.stats.upstream_latencies.append(time.perf_counter() - started)
            self.breaker.record_success()
            self.auth_failed = False
            if batch.rate_remaining is not None:
                await self.budget.observe_remaining(batch.rate_remaining)
            log.info(
                "fetched batch of %d ids: %d found in %.0f ms",
                len(user_ids),
                len(batch.users),
                (time.perf_counter() - started) * 1000,
            )
            return batch

    async def _failed(self, exc: UpstreamError) -> None:
        self.stats.upstream_errors += 1
        self.breaker.record_failure()
        if isinstance(exc, UpstreamAuthError):
            self.auth_failed = True
        if isinstance(exc, UpstreamRateLimited):
            await self.budget.pause(exc.retry_after or 1.0)
