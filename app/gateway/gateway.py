"""The single-flight core: memory → store → in-flight futures → queue → batched upstream calls.

A lookup answers what it can from the in-memory LRU (no await), reads the rest from the
store in one query, then, *with no await in between*, re-checks memory, joins the Future
of a fetch already in flight, or registers a new one and queues the id. It then awaits
all its Futures together with `asyncio.wait` (which never cancels them) until one
deadline. The worker owns every fetch: it drains the queue into batches, calls
Freelancer with retries under a token bucket and a circuit breaker, and in one
synchronous step updates memory, resolves the Futures and removes the in-flight
entries. Futures carry values (a `CachedUser` or a `Failure`), never exceptions.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from app.clock import Clock, wall_clock
from app.config import Settings
from app.domain import UserRecord
from app.errors import Overloaded, ShuttingDown, StoreUnavailable, UpstreamError
from app.gateway.breaker import CircuitBreaker
from app.gateway.budget import Budget, LocalBudget, Window
from app.gateway.cache import LRU, CachedUser, ExpiringMap, cache_entry, fetched_at, record_of
from app.gateway.resilient import ResilientUpstream
from app.gateway.results import (
    BREAKER_OPEN,
    INTERNAL,
    NOT_FOUND,
    RATE_LIMITED,
    SHUTDOWN,
    TIMEOUT,
    Failure,
    LookupResult,
    Outcome,
    Source,
)
from app.gateway.stats import GatewayStats
from app.gateway.write_behind import WriteBehind
from app.store.base import UserStore
from app.upstream.base import Upstream, UpstreamBatch

log = logging.getLogger("app.gateway")

UpstreamState = Literal["ok", "throttled", "open"]

# Queue priorities: a waiting client first, then refreshes of stale hits, then the sweep.
PRIORITY_MISS = 0
PRIORITY_REFRESH = 1
PRIORITY_SWEEP = 2

DEGRADED_AFTER_RESTART_S = 300.0


@dataclass(slots=True)
class Fetch:
    """One id's fetch in flight: the Future its waiters await."""

    future: asyncio.Future[Outcome]
    previous: UserRecord | None
    waiters: int = 0


class Gateway:
    """Answers "who are these users?" spending as few upstream calls as possible."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: UserStore,
        upstream: Upstream,
        budget: Budget | None = None,
        clock: Clock = wall_clock,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.stats = GatewayStats()
        self.budget = budget or LocalBudget(budget_windows(settings))
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown_s)
        self.upstream = ResilientUpstream(
            upstream,
            budget=self.budget,
            breaker=self.breaker,
            stats=self.stats,
            max_attempts=settings.upstream_max_attempts,
            backoff_base_s=settings.upstream_backoff_s,
        )
        self.writes = WriteBehind(
            store,
            stats=self.stats,
            attempts=settings.store_save_attempts,
            keep_max=settings.memory_cache_size,
        )
        self._lru: LRU[CachedUser] = LRU(settings.memory_cache_size)
        self._not_found: ExpiringMap[bool] = ExpiringMap(settings.negative_cache_size)
        self._failing: ExpiringMap[Failure] = ExpiringMap(settings.negative_cache_size)
        self._inflight: dict[int, Fetch] = {}
        self._queue: asyncio.PriorityQueue[tuple[int, int, int]] = asyncio.PriorityQueue(
            settings.queue_max
        )
        self._seq = itertools.count()
        self._slots = asyncio.Semaphore(settings.upstream_concurrency)
        self._in_hand: list[int] = []
        self._batches: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._restarted_at: float | None = None

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store (or keep retrying in the background) and start the worker."""
        if not await self.writes.open():
            self._spawn(self.writes.reopen(), "store-reopen")
        self._supervisor = self._spawn(self._supervise(), "worker-supervisor")
        if self.settings.refresh_interval_s > 0:
            self._spawn(self._sweep(), "refresh-sweep")

    async def stop(self) -> None:
        """Stop taking work, let fetches finish for SHUTDOWN_GRACE_S, answer every waiter."""
        self._closing = True
        await _cancel_all({t for t in self._tasks if t is not self._supervisor})
        await self.wait_idle(self.settings.shutdown_grace_s)
        await _cancel_all(self._tasks | self._batches)
        while not self._queue.empty():
            self._queue.get_nowait()
        self._complete(list(self._inflight), {}, SHUTDOWN)
        if self.writes.pending and self.writes.store_ready:
            await self.writes.save([])
        await self.store.close()

    async def wait_idle(self, within_s: float) -> bool:
        """Wait until no fetch is queued or running (saves included); False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while self._inflight or self._batches:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            waitables: list[asyncio.Future[Any]] = [f.future for f in self._inflight.values()]
            waitables.extend(self._batches)
            await asyncio.wait(waitables, timeout=remaining)
        return True

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def store_ready(self) -> bool:
        """False since a store read or save failed, until one succeeds."""
        return self.writes.store_ready

    @store_ready.setter
    def store_ready(self, ready: bool) -> None:
        self.writes.store_ready = ready

    # ---- lookups ---------------------------------------------------------------------

    async def lookup(self, user_ids: Sequence[int]) -> LookupResult:
        """Users for distinct `user_ids`, within WAIT_TIMEOUT_S, in request order."""
        if self._closing:
            raise ShuttingDown("the gateway is shutting down; retry against another instance")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.wait_timeout_s
        self.stats.requests += 1
        self.stats.ids_requested += len(user_ids)
        answers: dict[int, tuple[Source, Outcome]] = {}
        previous: dict[int, UserRecord] = {}
        pending = self._answer_from_memory(user_ids, answers, previous)
        if pending:
            await self._answer_misses(pending, answers, previous, deadline)
        return self._render(user_ids, answers)

    def _answer_from_memory(
        self,
        user_ids: Iterable[int],
        answers: dict[int, tuple[Source, Outcome]],
        previous: dict[int, UserRecord],
    ) -> list[int]:
        """Answer ids from the LRU and the not-found cache; return the rest. No await."""
        now = self.clock()
        fresh_after = now - self.settings.cache_ttl_s
        servable_after = fresh_after - self.settings.stale_if_error_s
        lru_get = self._lru.get
        pending: list[int] = []
        for uid in user_ids:
            entry = lru_get(uid)
            if entry is not None:
                fetched = fetched_at(entry)
                if fetched > fresh_after:
                    answers[uid] = ("cache", entry)
                    continue
                if fetched > servable_after:
                    answers[uid] = ("stale", entry)
                    self._schedule_refresh(uid, record_of(entry), PRIORITY_REFRESH, now)
                    continue
                previous[uid] = record_of(entry)  # too stale to serve: a miss that keeps created_at
            if self._not_found.get(uid, now) is not None:
                answers[uid] = ("cache", NOT_FOUND)
                continue
            pending.append(uid)
        return pending

    async def _answer_misses(
        self,
        pending: list[int],
        answers: dict[int, tuple[Source, Outcome]],
        previous: dict[int, UserRecord],
        deadline: float,
    ) -> None:
        stored = await self._read_store(pending)
        for record in stored.values():
            self._remember(record)
        # From here to the registration there is no await: the worker cannot complete a
        # fetch between our last look at memory and our decision to start a new one.
        pending = self._answer_from_memory(pending, answers, previous)
        now = self.clock()
        new: list[int] = []
        joined: list[tuple[int, Fetch]] = []
        for uid in pending:
            fetch = self._inflight.get(uid)
            if fetch is not None:
                joined.append((uid, fetch))
                continue
            failing = self._failing.get(uid, now)
            if failing is not None:
                answers[uid] = ("fetched", failing)
            elif self.breaker.rejecting:
                answers[uid] = ("fetched", BREAKER_OPEN)
            else:
                new.append(uid)
        self.stats.cache_misses += len(pending)
        self._check_bounds(len(new), joined)
        waits: list[tuple[int, Source, Fetch]] = [(uid, "shared", f) for uid, f in joined]
        for uid in new:
            waits.append((uid, "fetched", self._register(uid, previous.get(uid), PRIORITY_MISS)))
        if not waits:
            return
        self.stats.fetched += len(new)
        self.stats.coalesced += len(joined)
        if new:
            log.debug("queued %d ids, joined %d fetches in flight", len(new), len(joined))
        for _, _, fetch in waits:
            fetch.waiters += 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            if deadline > started:
                await asyncio.wait({f.future for _, _, f in waits}, timeout=deadline - started)
        finally:
            for _, _, fetch in waits:
                fetch.waiters -= 1
        log.debug("waited %.0f ms for %d ids", (loop.time() - started) * 1000, len(waits))
        late = self._late_failure()
        for uid, source, fetch in waits:
            answers[uid] = (source, fetch.future.result() if fetch.future.done() else late)

    async def _read_store(self, user_ids: list[int]) -> dict[int, UserRecord]:
        try:
            stored = await self.store.get_many(user_ids)
        except StoreUnavailable:
            self.stats.store_errors += 1
            self.store_ready = False
            raise
        self.store_ready = True
        return stored

    def _remember(self, record: UserRecord) -> None:
        """Put a stored record in memory unless memory already holds a newer copy."""
        held = self._lru.get(record.user_id)
        if held is None or fetched_at(held) < record.fetched_at:
            self._lru.put(record.user_id, cache_entry(record))

    def _check_bounds(self, new: int, joined: list[tuple[int, Fetch]]) -> None:
        """Refuse the whole request, before registering anything, when a bound is hit."""
        free = self._queue.maxsize - self._queue.qsize()
        limit = self.settings.max_waiters_per_id
        if new > free or any(fetch.waiters >= limit for _, fetch in joined):
            self.stats.shed += 1
            raise Overloaded(
                f"too many lookups waiting ({self._queue.qsize()} ids queued); retry shortly",
                retry_after=1.0,
            )

    def _late_failure(self) -> Failure:
        return RATE_LIMITED if self.budget.throttled else TIMEOUT

    def _register(self, uid: int, previous: UserRecord | None, priority: int) -> Fetch:
        fetch = Fetch(asyncio.get_running_loop().create_future(), previous)
        self._inflight[uid] = fetch
        self._queue.put_nowait((priority, next(self._seq), uid))
        return fetch

    def _schedule_refresh(
        self, uid: int, record: UserRecord | None, priority: int, now: float
    ) -> bool:
        """Queue a background refresh unless one is running, failing, or there is no room."""
        if (
            self._closing
            or uid in self._inflight
            or self._queue.full()
            or self.breaker.rejecting
            or self._failing.get(uid, now) is not None
        ):
            return False
        self._register(uid, record, priority)
        self.stats.refreshes_queued += 1
        return True

    def _render(
        self, user_ids: Sequence[int], answers: dict[int, tuple[Source, Outcome]]
    ) -> LookupResult:
        stats = self.stats
        users: list[tuple[CachedUser, Source]] = []
        not_found: list[int] = []
        unavailable: list[int] = []
        errors: dict[str, str] = {}
        for uid in user_ids:
            source, outcome = answers[uid]
            if not isinstance(outcome, Failure):
                users.append((outcome, source))
                if source == "cache":
                    stats.cache_hits += 1
                elif source == "stale":
                    stats.stale_hits += 1
            elif outcome.reason == "not_found":
                not_found.append(uid)
                stats.not_found += 1
                if source == "cache":
                    stats.negative_hits += 1
            else:
                unavailable.append(uid)
                errors[str(uid)] = outcome.reason
                stats.unavailable += 1
                stats.unavailable_reasons[outcome.reason] += 1
        return LookupResult(users, not_found, unavailable, errors)

    # ---- cache administration --------------------------------------------------------

    async def evict(self, user_id: int) -> bool:
        """Forget one user everywhere (store, memory, negative caches); True if it was known."""
        in_store = await self.store.delete(user_id)
        in_memory = self._lru.pop(user_id) is not None
        negative = self._not_found.pop(user_id) | self._failing.pop(user_id)
        self.writes.forget(user_id)
        return in_store or in_memory or negative

    async def clear_expired(self) -> int:
        """Remove users past CACHE_TTL_S + STALE_IF_ERROR_S from store and memory."""
        cutoff = self.clock() - self.settings.cache_ttl_s - self.settings.stale_if_error_s
        removed = await self.store.delete_fetched_before(cutoff)
        for uid, entry in self._lru.items():
            if fetched_at(entry) < cutoff:
                self._lru.pop(uid)
        return removed

    async def revalidate(self, user_ids: Sequence[int]) -> int:
        """Queue background refreshes of these ids (uncached ones are prefetched)."""
        stored = await self._read_store([u for u in user_ids if u not in self._lru])
        now = self.clock()
        queued = 0
        for uid in user_ids:
            entry = self._lru.get(uid)
            record = record_of(entry) if entry is not None else stored.get(uid)
            queued += self._schedule_refresh(uid, record, PRIORITY_SWEEP, now)
        return queued

    async def revalidate_older_than(self, age_s: float) -> int:
        """Queue refreshes of stored users fetched more than `age_s` ago, as room allows."""
        room = self._queue.maxsize - self._queue.qsize()
        if room <= 0:
            return 0
        try:
            records = await self.store.fetched_before(self.clock() - age_s, limit=room)
        except StoreUnavailable:
            self.stats.store_errors += 1
            raise
        now = self.clock()
        return sum(self._schedule_refresh(r.user_id, r, PRIORITY_SWEEP, now) for r in records)

    # ---- state for monitoring --------------------------------------------------------

    @property
    def queue_size(self) -> int:
        """Ids waiting for the worker."""
        return self._queue.qsize()

    @property
    def processing_count(self) -> int:
        """Ids with a fetch in flight (queued or being fetched)."""
        return len(self._inflight)

    def processing_ids(self, limit: int = 1000) -> list[int]:
        """Up to `limit` ids with a fetch in flight."""
        return list(itertools.islice(self._inflight, limit))

    @property
    def memory_cache_size(self) -> int:
        """Users held in the in-memory LRU."""
        return len(self._lru)

    @property
    def upstream_state(self) -> UpstreamState:
        """`open` while the breaker refuses calls, `throttled` while rate-limited, else `ok`."""
        if self.breaker.state != "closed":
            return "open"
        return "throttled" if self.budget.throttled else "ok"

    def problems(self) -> list[str]:
        """Why the service is degraded; empty when healthy."""
        problems = []
        if not self.store_ready:
            problems.append(f"store unavailable: check {self.store.setting}")
        if self.upstream.auth_failed:
            problems.append(
                "Freelancer rejected the credentials: check FREELANCER_OAUTH_TOKEN / "
                "FREELANCER_CLIENT_ID"
            )
        if self.breaker.state != "closed":
            problems.append("Freelancer is failing: circuit breaker open")
        restarted = self._restarted_at
        if restarted is not None and self.clock() - restarted < DEGRADED_AFTER_RESTART_S:
            problems.append("the fetch worker crashed and was restarted")
        return problems

    # ---- the worker ------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Run the worker; if it ever dies, fail what it held, restart it and say degraded."""
        while not self._closing:
            try:
                await self._work()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("fetch worker crashed; restarting it")
            self.stats.worker_restarts += 1
            self._restarted_at = self.clock()
            self._complete(self._in_hand, {}, INTERNAL)
            self._in_hand.clear()
            await asyncio.sleep(0.1)

    async def _work(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.create_task(self._run_batch(batch), name="fetch-batch")
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
            self._in_hand = []

    async def _next_batch(self) -> list[int]:
        """The first queued id, what else is queued, and what arrives within the window."""
        batch = self._in_hand = [(await self._queue.get())[2]]
        size = self.settings.batch_size
        self._drain(batch, size)
        if len(batch) < size and self.settings.batch_window_ms > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.settings.batch_window_ms / 1000
            while len(batch) < size:
                try:
                    # asyncio.timeout, not wait_for: a cancelled Queue.get leaves its item
                    # queued, while Python 3.11's wait_for can drop a just-received one.
                    async with asyncio.timeout_at(deadline):
                        batch.append((await self._queue.get())[2])
                except TimeoutError:
                    break
                self._drain(batch, size)
        return batch

    def _drain(self, batch: list[int], size: int) -> None:
        while len(batch) < size and not self._queue.empty():
            batch.append(self._queue.get_nowait()[2])

    async def _run_batch(self, ids: list[int]) -> None:
        outcomes: dict[int, Outcome] = {}
        default = INTERNAL
        records: list[UserRecord] = []
        gone: list[int] = []
        try:
            try:
                batch = await self.upstream.fetch_users(ids)
            finally:
                self._slots.release()
            outcomes, records, gone = self._outcomes(ids, batch)
        except UpstreamError as exc:
            failure = Failure(exc.reason, exc.message)
            outcomes = dict.fromkeys(ids, failure)
            log.warning("batch of %d ids failed: %s", len(ids), exc.message)
        except asyncio.CancelledError:
            default = SHUTDOWN
            raise
        except Exception:
            log.exception("batch of %d ids failed unexpectedly", len(ids))
        finally:
            self._complete(ids, outcomes, default)
        if records or self.writes.pending:
            await self.writes.save(records)
        for uid in gone:
            await self.writes.delete(uid)

    def _outcomes(
        self, ids: list[int], batch: UpstreamBatch
    ) -> tuple[dict[int, Outcome], list[UserRecord], list[int]]:
        """Each id's outcome, the records to save, and previously cached ids now gone."""
        outcomes: dict[int, Outcome] = {}
        records: list[UserRecord] = []
        gone: list[int] = []
        for uid in ids:
            record = batch.users.get(uid)
            fetch = self._inflight.get(uid)
            previous = fetch.previous if fetch is not None else None
            if record is None:
                outcomes[uid] = NOT_FOUND
                if previous is not None:
                    gone.append(uid)
                continue
            if previous is not None:
                record = record._replace(created_at=previous.created_at)
            records.append(record)
            outcomes[uid] = cache_entry(record)
        self.stats.upstream_users_fetched += len(records)
        return outcomes, records, gone

    def _complete(self, ids: Iterable[int], outcomes: dict[int, Outcome], default: Failure) -> None:
        """Publish outcomes to memory, resolve the Futures and drop the in-flight entries.

        Synchronous on purpose: a lookup sees either the in-flight entry or the result.
        """
        now = self.clock()
        settings = self.settings
        for uid in ids:
            outcome = outcomes.get(uid, default)
            if not isinstance(outcome, Failure):
                self._lru.put(uid, outcome)
                self._failing.pop(uid)
                self._not_found.pop(uid)
            elif outcome is NOT_FOUND:
                self._not_found.put(uid, True, now + settings.not_found_ttl_s)
                self._lru.pop(uid)
            elif outcome is not SHUTDOWN:
                self._failing.put(uid, outcome, now + settings.error_ttl_s)
            fetch = self._inflight.pop(uid, None)
            if fetch is not None and not fetch.future.done():
                fetch.future.set_result(outcome)

    async def _sweep(self) -> None:
        """Refresh users that will turn stale within the next interval, at low priority."""
        interval = self.settings.refresh_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                queued = await self.revalidate_older_than(self.settings.cache_ttl_s - interval)
            except StoreUnavailable as exc:
                log.warning("refresh sweep skipped: %s", exc)
                continue
            if queued:
                log.info("refresh sweep queued %d users", queued)


def budget_windows(settings: Settings) -> list[Window]:
    """Freelancer's limits as budget windows, from the settings."""
    return [Window("minute", settings.upstream_rate_per_min, 60.0, settings.upstream_burst)]


async def _cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    for task in list(tasks):
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
