"""The single-flight core: memory → store → in-flight futures → queue → batched upstream calls.

A lookup answers from memory with no await, reads the rest from the store in one query
(SQLite: at once, on this thread, so store hits too are answered with no await; see
`app.store.sqlite`), then, *with no await in between*, re-checks memory, joins a Future
in flight or registers one and queues the id, and awaits its Futures (never cancelling
them) until one deadline.
The worker has the `Planner` spend a call and gather its batch, claims it through the
`Coordinator`, calls the `ResilientUpstream`, and in one synchronous step (`_complete`)
updates memory, resolves the Futures and drops the in-flight entries. Futures carry values.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from app.clock import Clock, wall_clock
from app.config import Settings
from app.domain import StoredUser, UserRecord
from app.errors import Overloaded, ShuttingDown, StoreUnavailable
from app.gateway import coordinator as coord
from app.gateway.admin import CacheAdmin
from app.gateway.batching import (
    PRIORITY_JOB,
    PRIORITY_MISS,
    PRIORITY_REFRESH,
    BatchQueue,
    loop_clock,
)
from app.gateway.breaker import CircuitBreaker
from app.gateway.budget import Budget, LocalBudget, budget_windows
from app.gateway.cache import from_store
from app.gateway.flight import Fetch, PendingLookup, cancel_all, wait_idle
from app.gateway.memory import Memory
from app.gateway.planner import Planner
from app.gateway.popularity import PopularityShare
from app.gateway.refresh_ahead import RefreshAhead
from app.gateway.resilient import ResilientUpstream
from app.gateway.results import (
    BREAKER_OPEN,
    INTERNAL,
    QUOTA,
    RATE_LIMITED,
    SHUTDOWN,
    TIMEOUT,
    Failure,
    LookupResult,
    Outcome,
    Source,
    render,
)
from app.gateway.stats import GatewayStats
from app.gateway.worker import FetchWorker
from app.gateway.write_behind import WriteBehind
from app.logs import request_id
from app.store.base import UserStore
from app.upstream.base import Upstream

log = logging.getLogger("app.gateway")


class Gateway:
    """Answers "who are these users?" spending as few upstream calls as possible."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: UserStore,
        upstream: Upstream,
        budget: Budget | None = None,
        coordinator: coord.Coordinator | None = None,
        popularity: PopularityShare | None = None,
        clock: Clock = wall_clock,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.stats = GatewayStats()
        self.budget = budget or LocalBudget(budget_windows(settings), clock=loop_clock)
        self.coordinator = coordinator or coord.LocalCoordinator()
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_cooldown_s)
        self.queue = BatchQueue(settings.queue_max)
        self.planner = Planner(self.budget, self.queue, settings)
        self.upstream = ResilientUpstream(
            upstream, self.planner, breaker=self.breaker, stats=self.stats, settings=settings
        )
        self.writes = WriteBehind(store, stats=self.stats, settings=settings)
        self.memory = Memory(settings)
        self.admin = CacheAdmin(self)
        self.inflight: dict[int, Fetch] = {}
        """The single-flight table: one entry per id queued or being fetched."""
        self.worker = FetchWorker(self)
        self.refresh_ahead = RefreshAhead(self, popularity)
        if settings.refresh_ahead:  # its counts decide which store hits memory admits
            self.memory.popularity = self.refresh_ahead.popularity
        self._sample_at = 1 if settings.refresh_ahead else sys.maxsize
        """The request count at which the next lookup's ids are sampled for popularity."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        """Open the store (or keep retrying in the background) and start the worker."""
        if not await self.writes.open():
            self._spawn(self.writes.reopen(), "store-reopen")
        await self.coordinator.open(self._on_event)
        self._supervisor = self._spawn(self.worker.supervise(), "worker-supervisor")
        self._spawn(self.planner.keep_reading(), "budget-reader")
        if self.settings.refresh_interval_s > 0:
            self._spawn(self.admin.sweep(), "refresh-sweep")
        if self.settings.refresh_ahead:
            self._spawn(self.refresh_ahead.run(), "refresh-ahead")

    async def stop(self) -> None:
        """Stop taking work, let fetches finish for SHUTDOWN_GRACE_S, answer every waiter."""
        self._closing = True
        await cancel_all({t for t in self._tasks if t is not self._supervisor})
        await self.wait_idle(self.settings.shutdown_grace_s)
        await cancel_all(self._tasks | self.worker.batches)
        self.queue.clear()
        self.complete(list(self.inflight), {}, SHUTDOWN)
        await self.coordinator.close()
        if self.writes.pending and self.writes.store_ready:
            await self.writes.save([])
        await self.store.close()

    async def wait_idle(self, within_s: float) -> bool:
        """Wait until no fetch is queued or running (saves included); False on timeout."""
        return await wait_idle(self.inflight, self.worker.batches, within_s)

    @property
    def closing(self) -> bool:
        """True once `stop` began: no new work is taken."""
        return self._closing

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        self._tasks.add(task := asyncio.create_task(coro, name=name))
        task.add_done_callback(self._tasks.discard)
        return task

    async def lookup(self, user_ids: Sequence[int]) -> LookupResult:
        """Users for distinct `user_ids`, within WAIT_TIMEOUT_S, in request order."""
        result = self.lookup_now(user_ids)
        return result if isinstance(result, LookupResult) else await self.finish(result)

    def lookup_now(self, user_ids: Sequence[int]) -> LookupResult | PendingLookup:
        """The answer if memory holds it (no await), else a lookup for `finish` to complete."""
        if self._closing:
            raise ShuttingDown("the gateway is shutting down; retry against another instance")
        stats = self.stats
        stats.requests += 1
        stats.ids_requested += len(user_ids)
        if stats.requests >= self._sample_at:  # the hot path's whole cost of counting
            self._sample(user_ids)
        now = self.clock()
        answered = self.memory.fresh(user_ids, now)
        if answered is not None:
            hits, missing = answered
            stats.cache_hits += len(hits)
            if missing:
                stats.not_found += len(missing)
                stats.negative_hits += len(missing)
            return LookupResult(hits, not_found=missing)
        deadline = asyncio.get_running_loop().time() + self.settings.wait_timeout_s
        lookup = PendingLookup(user_ids, [], deadline)
        pending = self._answer_from_memory(user_ids, lookup, now)
        stored = self.writes.read_now(pending) if pending else None
        if stored is not None:  # read with no await: SQLite, on this thread
            stored = self._with_unsaved(pending, stored)
            pending = self._answer_from_memory(pending, lookup, now, stored)
        lookup.pending = pending
        if not pending:
            return render(user_ids, lookup.answers, stats)
        return lookup

    def _sample(self, user_ids: Sequence[int]) -> None:
        """Note a lookup's ids for refresh-ahead; the next sample in `every` lookups."""
        popularity = self.refresh_ahead.popularity
        popularity.saw(user_ids)
        self._sample_at = self.stats.requests + popularity.every

    async def finish(self, lookup: PendingLookup) -> LookupResult:
        """Complete a lookup from the store and fetches, by its deadline."""
        # Read again, though `lookup_now` may have read these ids: an await may have come
        # between (a fetch completed, its user not held in memory, but saved).
        stored = self.writes.read_now(lookup.pending)
        if stored is None:
            stored = await self.writes.read_rendered(lookup.pending)
        stored = self._with_unsaved(lookup.pending, stored)
        # From here to the registration there is no await: the worker cannot complete a
        # fetch between our last look at memory and our decision to start a new one.
        pending = self._answer_from_memory(lookup.pending, lookup, stored=stored)
        waits = self._join_or_register(pending, lookup)
        if waits:
            await self._wait(waits, lookup)
        return render(lookup.user_ids, lookup.answers, self.stats)

    def _with_unsaved(
        self, user_ids: list[int], stored: dict[int, StoredUser]
    ) -> dict[int, StoredUser]:
        """`stored`, with the copies the store may not have yet (a job's fetch, not held in
        memory, whose save failed or is under way) where they are newer."""
        if not self.writes.holding:
            return stored
        held = self.writes.held
        for uid in user_ids:
            record = held(uid)
            if record is not None and (uid not in stored or stored[uid][1] < record.fetched_at):
                stored[uid] = (record.rendered(), record.fetched_at)
        return stored

    def _answer_from_memory(
        self,
        user_ids: Iterable[int],
        lookup: PendingLookup,
        now: float | None = None,
        stored: Mapping[int, StoredUser] | None = None,
    ) -> list[int]:
        """Answer ids from memory (and users just read from the store, which memory then
        holds), queueing refreshes of stale ones; return the rest. No await."""
        now = self.clock() if now is None else now
        answers, previous = lookup.answers, lookup.previous
        pending, stale = self.memory.answer(user_ids, now, answers, previous, stored)
        popular = self.refresh_ahead.popular
        for record in stale:
            if record.user_id in popular:
                self.stats.stale_popular += 1
            else:
                self.stats.stale_other += 1
            self.schedule_refresh(record.user_id, record, PRIORITY_REFRESH, now)
        return pending

    def _join_or_register(
        self, pending: list[int], lookup: PendingLookup
    ) -> list[tuple[int, Source, Fetch]]:
        """Join fetches in flight, answer ids known to fail, register the rest. No await."""
        now = self.clock()
        new: list[int] = []
        waits: list[tuple[int, Source, Fetch]] = []
        for uid in pending:
            fetch = self.inflight.get(uid)
            if fetch is not None:
                waits.append((uid, "shared", fetch))
                continue
            failing = self.memory.failing.get(uid, now)
            if failing is not None:
                lookup.answers[uid] = ("fetched", failing)
            elif self.breaker.rejecting:
                lookup.answers[uid] = ("fetched", BREAKER_OPEN)
            else:
                new.append(uid)
        self.stats.cache_misses += len(pending)
        if lookup.allow_misses is not None and new:
            allowed = lookup.allow_misses(len(new))
            lookup.answers.update((uid, ("fetched", QUOTA)) for uid in new[allowed:])
            del new[allowed:]
        # A bound hit refuses the whole request, before anything of it is registered.
        limit = self.settings.max_waiters_per_id
        if len(new) > self.queue.room or any(f.waiters >= limit for _, _, f in waits):
            self.stats.shed += 1
            raise Overloaded(
                f"too many lookups waiting ({self.queue.qsize()} ids queued); retry shortly",
                retry_after=1.0,
            )
        self.stats.coalesced += len(waits)
        self.stats.fetched += len(new)
        for uid in new:
            fetch = self._register(uid, lookup.previous.get(uid), PRIORITY_MISS)
            waits.append((uid, "fetched", fetch))
            lookup.started.append(fetch)
        return waits

    async def _wait(self, waits: list[tuple[int, Source, Fetch]], lookup: PendingLookup) -> None:
        """Wait for every Future until the deadline (never cancelling them); record answers."""
        for _, _, fetch in waits:
            fetch.waiters += 1
        loop = asyncio.get_running_loop()
        try:
            if lookup.deadline > loop.time():
                futures = {fetch.future for _, _, fetch in waits}
                await asyncio.wait(futures, timeout=lookup.deadline - loop.time())
        finally:
            for _, _, fetch in waits:
                fetch.waiters -= 1
        late = RATE_LIMITED if self.budget.throttled else TIMEOUT
        for uid, source, fetch in waits:
            lookup.answers[uid] = (source, fetch.future.result() if fetch.future.done() else late)

    def _register(self, uid: int, previous: UserRecord | None, priority: int) -> Fetch:
        future = asyncio.get_running_loop().create_future()
        fetch = self.inflight[uid] = Fetch(future, previous, request_id=request_id.get())
        self.queue.put_nowait(uid, priority)
        return fetch

    def schedule_refresh(
        self, uid: int, record: UserRecord | None, priority: int, now: float
    ) -> bool:
        """Queue a background refresh unless one is running, failing, or there is no room."""
        if (
            self._closing
            or uid in self.inflight
            or self.queue.room_for(priority) <= 0
            or self.breaker.rejecting
            or self.memory.failing.get(uid, now) is not None
        ):
            return False
        self._register(uid, record, priority)
        self.stats.refreshes_queued += priority != PRIORITY_JOB
        return True

    def enlist(
        self, user_ids: Iterable[int], previous: Mapping[int, UserRecord]
    ) -> dict[int, Fetch | None]:
        """A job's ids join fetches in flight or start ones in the job lane (their users
        are not added to memory); None where none can start now. No await."""
        now = self.clock()
        for uid in user_ids:
            if uid not in self.inflight and self.schedule_refresh(
                uid, previous.get(uid), PRIORITY_JOB, now
            ):
                self.inflight[uid].background = True
        return {uid: self.inflight.get(uid) for uid in user_ids}

    def forget(self, user_id: int) -> bool:
        """Drop an id from memory, the store and its unsaved copy; True if memory knew it."""
        self._spawn(self.writes.delete(user_id), "forget")  # a copy saved here late, too
        return self.memory.forget(user_id, self.clock())

    @property
    def processing_count(self) -> int:
        return len(self.inflight)  # ids with a fetch in flight (queued or being fetched)

    def processing_ids(self, limit: int = 1000) -> list[int]:
        return list(itertools.islice(self.inflight, limit))  # up to `limit` ids in flight

    def complete(
        self, ids: Iterable[int], outcomes: Mapping[int, Outcome], default: Failure
    ) -> None:
        """Outcomes into memory, Futures resolved, in-flight entries dropped: in one step,
        synchronous on purpose (a lookup sees either the in-flight entry or the result)."""
        now = self.clock()
        for uid in ids:
            fetch = self.inflight.pop(uid, None)
            hold = fetch is not None and (not fetch.background or fetch.waiters > 0)
            hold = hold or uid in self.writes.reading  # a lookup's read may miss its save
            outcome = self.memory.learn(uid, outcomes.get(uid, default), now, hold=hold)
            if fetch is not None and not fetch.future.done():
                fetch.future.set_result(outcome)

    def _learn(self, outcomes: Mapping[int, Outcome]) -> None:
        """Outcomes another process fetched (or the store had): waiters are answered,
        memory updated only where it holds the user, and no call was spent here."""
        for fetch in filter(None, map(self.inflight.get, outcomes)):
            fetch.elsewhere = True
        self.memory.learn_elsewhere(outcomes, self.inflight, self.clock())
        self.complete(self.inflight.keys() & outcomes, outcomes, INTERNAL)

    def _on_event(self, event: coord.Event) -> None:
        """Apply what another process did: its fetches, abandoned claims, cache changes."""
        if isinstance(event, coord.Fetched):  # answers waiters; elsewhere adds no user
            self._learn(event.outcomes)
        elif isinstance(event, coord.Abandoned):
            waiting = [u for u in event.user_ids if (f := self.inflight.get(u)) and f.taken]
            if waiting:
                self._spawn(self._take_over(waiting), "take-over")
        elif isinstance(event, coord.Evicted):
            for uid in event.user_ids:
                self.forget(uid)
        else:
            self.memory.expire_before(event.cutoff)

    async def _take_over(self, ids: list[int]) -> None:
        """Ids another process stopped fetching: answer what the store has, queue the rest."""
        try:
            stored = await self.writes.read_rendered(ids)
        except StoreUnavailable:
            stored = {}
        fresh_after = self.clock() - self.settings.cache_ttl_s
        self._learn({u: from_store(s) for u, s in stored.items() if s[1] > fresh_after})
        for uid in ids:
            fetch = self.inflight.get(uid)
            if fetch is not None and fetch.taken:
                fetch.taken = 0
                try:
                    self.queue.put_nowait(uid, PRIORITY_MISS)
                except asyncio.QueueFull:
                    self.complete([uid], {}, INTERNAL)
