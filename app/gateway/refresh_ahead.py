"""Refresh-ahead by popularity: the most asked users are refreshed before they turn stale,
with spare budget only.

Every `tick_s` each process folds its counts (`app.gateway.popularity`) and shares them
(`PopularityShare`); the leading process (the only one, when alone) takes the deployment's
ids asked for at least REFRESH_AHEAD_MIN_HITS times per CACHE_TTL_S, most asked first,
and queues refreshes of those whose copy is older than REFRESH_AHEAD_AT of the TTL, in the
lowest lane (the sweep's). It queues only what the planner says the refresh lane could
spend now (`Planner.spare_calls`: nothing while a client's miss or a job's ids wait, the
reserve and the pace kept), 100 ids to a call, and never more batches than leave a slot
free for a client. As Caffeine's refreshAfterWrite, a popular user is refreshed while its
copy is still served fresh; unlike it, nothing is refreshed on a read, so a read never
pays for it. `coverage()` says how many of the popular set are fresh (`GET /` shows it).
Before an id is queued on memory's word, the store is asked too: another process may have
refreshed it, and its announcement may never have come.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.errors import StoreUnavailable
from app.gateway.batching import PRIORITY_REFRESH, PRIORITY_SWEEP
from app.gateway.cache import cache_entry, record_of
from app.gateway.popularity import LocalShare, Popularity, PopularityShare

if TYPE_CHECKING:
    from app.domain import UserRecord
    from app.gateway.gateway import Gateway

log = logging.getLogger("app.gateway")

TICK_S = 5.0
"""The longest between two looks (shorter with a short TTL: a tenth of the time left to
refresh in)."""
SHARE_TOP = 5000
"""The most asked ids a process shares and the leader considers each look."""


@dataclass(frozen=True, slots=True)
class Coverage:
    """Of the popular set, how many ids have a fresh copy: what their readers get. A stale
    copy with a refresh under way is not covered (it is served stale until it lands)."""

    popular: int = 0
    covered: int = 0

    @property
    def ratio(self) -> float:
        return 1.0 if not self.popular else round(self.covered / self.popular, 4)


class RefreshAhead:
    """The refresh-ahead loop of one gateway (see the module docstring)."""

    def __init__(self, gateway: Gateway, share: PopularityShare | None = None) -> None:
        settings = gateway.settings
        self.gateway = gateway
        self.enabled = settings.refresh_ahead
        self.share: PopularityShare = share or LocalShare()
        self.popularity = Popularity(
            min_hits=settings.refresh_ahead_min_hits,
            max_ids=max(SHARE_TOP, settings.memory_cache_size),
            decay_s=settings.cache_ttl_s,
            now=gateway.clock(),
        )
        self.ttl_s = settings.cache_ttl_s
        self.due_after_s = settings.cache_ttl_s * settings.refresh_ahead_at
        self.tick_s = min(TICK_S, max(0.05, (self.ttl_s - self.due_after_s) / 10))
        self.popular: frozenset[int] = frozenset()
        """The popular set as last seen: the deployment's on the leader, else this process's."""
        self.coverage = Coverage()
        self._stored: dict[int, UserRecord] = {}
        """Copies this look judged ids by but memory may not hold: the store's (ids
        absent from memory), and memory's as they were before the store check."""

    async def run(self) -> None:
        """Look every `tick_s` until cancelled; a failed look is logged and tried again."""
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                queued = await self.tick()
            except StoreUnavailable as exc:
                log.warning("refresh-ahead skipped: %s", exc)
                continue
            except Exception:
                log.exception("refresh-ahead failed; trying again")
                continue
            if queued:
                log.debug("refresh-ahead queued %d users", queued)

    async def tick(self) -> int:
        """Fold and share the counts; on the leader, queue what is due and the budget
        spares, most asked first. Returns how many ids were queued."""
        gateway = self.gateway
        popularity = self.popularity
        popularity.fold(gateway.clock())
        self.popular = popularity.rank()
        merged = await self.share.merge(popularity.top(SHARE_TOP), min_hits=popularity.min_hits)
        if not gateway.coordinator.leads():
            return 0
        ranked = sorted(merged, key=merged.__getitem__, reverse=True)[:SHARE_TOP]
        self.popular = frozenset(ranked)
        copies, store_up = await self._copies(ranked)
        now = gateway.clock()
        inflight = gateway.inflight
        due_before = now - self.due_after_s
        due = [u for u in ranked if u in copies and copies[u] <= due_before and u not in inflight]
        if due:
            due = await self._not_refreshed_elsewhere(due, copies, due_before, store_up)
        queued = self._enlist(due, now) if due else 0
        # Freshness as of now, after the store's reads: a copy that passed its TTL while
        # they took is served stale, not covered.
        fresh_after = gateway.clock() - self.ttl_s
        self.coverage = Coverage(
            popular=len(copies),
            covered=sum(1 for at in copies.values() if at > fresh_after),
        )
        return queued

    def _enlist(self, due: list[int], now: float) -> int:
        """Queue the first of `due` that the spare budget covers; how many were queued."""
        gateway = self.gateway
        size = gateway.settings.batch_size
        # Calls at once, every lane's counted (a job's batches in a call are not queued, so
        # the planner sees spare budget): one slot always left to a client's miss, so with
        # UPSTREAM_CONCURRENCY=1 nothing is refreshed ahead.
        slots = gateway.settings.upstream_concurrency - 1 - gateway.worker.calling
        queued_refreshes = gateway.queue.qsize(PRIORITY_SWEEP) + gateway.queue.qsize(
            PRIORITY_REFRESH
        )
        room = min(gateway.planner.spare_calls(), slots) * size - queued_refreshes
        room = min(room, gateway.queue.room_for(PRIORITY_SWEEP))
        queued = 0
        for uid in due[: max(0, room)]:
            if gateway.schedule_refresh(uid, self._record(uid), PRIORITY_SWEEP, now):
                fetch = gateway.inflight[uid]
                fetch.ahead = fetch.leader_only = True
                queued += 1
        return queued

    async def _copies(self, ids: list[int]) -> tuple[dict[int, float], bool]:
        """When each id's copy was fetched: memory's (without marking it used), else the
        store's. Ids with neither (never found, or evicted) are left out. With the store
        down (False), memory's copies alone: its popular users are still refreshed."""
        peek = self.gateway.memory.users.peek
        copies: dict[int, float] = {}
        self._stored = {}
        absent: list[int] = []
        for uid in ids:
            entry = peek(uid)
            if entry is None:
                absent.append(uid)
            else:
                copies[uid] = entry[1]
        if absent:
            try:
                self._stored = await self.gateway.writes.read(absent)
            except StoreUnavailable as exc:
                log.warning("refresh-ahead judges by memory alone: %s", exc)
                return copies, False
            copies.update((u, r.fetched_at) for u, r in self._stored.items())
        return copies, True

    async def _not_refreshed_elsewhere(
        self, due: list[int], copies: dict[int, float], due_before: float, store_up: bool
    ) -> list[int]:
        """`due` less the ids whose copy is newer and not due: for ids judged by memory, a
        stored copy another process saved while this one missed its announcement (the
        link to Redis was down, or this process led only since); for every id, a client's
        fetch that landed in memory while the store answered (either read). Memory takes
        the stored copies, and `copies` says when the newest of each was fetched."""
        gateway = self.gateway
        judged_by_memory = [u for u in due if u not in self._stored]
        stored: dict[int, UserRecord] = {}
        # Once a read of this look failed the store is down for it: a second read would
        # hold the look another STORE_TIMEOUT_S for the same answer.
        if judged_by_memory and store_up:
            for uid in judged_by_memory:  # their copies' created_at, if memory drops one
                entry = gateway.memory.users.peek(uid)
                if entry is not None:
                    self._stored[uid] = record_of(entry)
            try:
                stored = await gateway.writes.read(judged_by_memory)
            except StoreUnavailable as exc:
                # Memory still serves: its popular users are refreshed rather than left
                # to turn stale for want of a second opinion.
                log.warning("refresh-ahead judges by memory alone: %s", exc)
        now = gateway.clock()
        for uid, record in stored.items():
            if record.fetched_at > copies[uid]:
                copies[uid] = record.fetched_at
                gateway.memory.learn(uid, cache_entry(record), now, hold=False)
        for uid in due:  # memory as it is now, after the reads' awaits
            entry = gateway.memory.users.peek(uid)
            if entry is not None and entry[1] > copies[uid]:
                copies[uid] = entry[1]
        return [u for u in due if copies[u] <= due_before]

    def _record(self, uid: int) -> UserRecord | None:
        """The copy being refreshed (its `created_at` is kept)."""
        entry = self.gateway.memory.users.peek(uid)
        # Else the copy the look judged it by: the store's, or memory's before the read.
        return record_of(entry) if entry is not None else self._stored.get(uid)
