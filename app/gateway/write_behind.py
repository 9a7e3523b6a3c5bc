"""The gateway's edge to the store: reads, saves after waiters have their answer, store health.

Waiters are answered before the save, so a slow or failing store never holds them up.
A save is retried briefly; what still failed is kept (bounded) and written with the next
batch. While the store cannot be opened it is reopened in the background.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from app.config import Settings
from app.domain import StoredUser, UserRecord
from app.errors import StoreUnavailable
from app.gateway.resilient import backoff_s
from app.gateway.stats import GatewayStats
from app.store.base import UserStore

T = TypeVar("T")

log = logging.getLogger("app.gateway")

SAVE_MAX_USERS = 1000
"""Users a save writes in one transaction: about 20 ms of SQLite's writer on this
project's benchmark machine, so a backlog is written in steps that each end well within
STORE_TIMEOUT_S, and reads between them."""
SAVE_BACKLOG_MAX = 4 * SAVE_MAX_USERS
"""Unsaved users past which the fetch worker waits (`room`) before its next call, while
the store is up: fetching faster than the store saves grew the backlog without bound.
In `make bench`'s warm-up (100 000 new users as fast as the simulator answers) the
backlog, each user held a second time as a record, took the process to 390 MB."""


@dataclass(slots=True)
class StoreRead:
    """One store read lookups share: the ids they asked for, and its outcome."""

    done: asyncio.Future[dict[int, StoredUser]]
    ids: set[int] = field(default_factory=set)

    def fail(self, exc: StoreUnavailable) -> None:
        """Fail every lookup waiting (one that gave up leaves the error unread: no warning)."""
        self.done.set_exception(exc)
        self.done.exception()


class WriteBehind:
    """Saves records with STORE_SAVE_ATTEMPTS tries; keeps up to MEMORY_CACHE_SIZE unsaved."""

    def __init__(self, store: UserStore, *, stats: GatewayStats, settings: Settings) -> None:
        self.store = store
        self.stats = stats
        self.attempts = settings.store_save_attempts
        self.keep_max = settings.memory_cache_size
        self.timeout_s = settings.store_timeout_s
        self._room = asyncio.Event()
        """Set while the backlog is under SAVE_BACKLOG_MAX or the store is down."""
        self._room.set()
        self._store_ready = False
        self._unsaved: dict[int, UserRecord] = {}
        self._turn = asyncio.Lock()
        """Held by the one save under way (see `save`)."""
        self._saving: dict[int, UserRecord] = {}
        """What a save under way is writing (not yet in the store)."""
        self._reading = False
        """A store read for lookups is on its way: lookups queue for the next one."""
        self.reading: dict[int, int] = {}
        """Ids lookups are reading from the store now, and by how many: a fetch of one that
        completes meanwhile is held in memory, since the read may have missed its save."""
        self._next_read: StoreRead | None = None
        self._read_task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> bool:
        """True while some fetched users wait for a save that succeeds."""
        return bool(self._unsaved)

    @property
    def holding(self) -> bool:
        """True while some users are held here that the store may not have yet."""
        return bool(self._unsaved or self._saving)

    @property
    def store_ready(self) -> bool:
        """Whether the store answered its last operation (health says degraded if not)."""
        return self._store_ready

    @store_ready.setter
    def store_ready(self, ready: bool) -> None:
        # Whoever marks the store down (a save, a read, the readiness probe) also ends a
        # worker's wait for saves that would not come.
        self._store_ready = ready
        self._update_room()

    @property
    def backlog(self) -> int:
        """Users fetched and not yet in the store (waiting, or in a save under way)."""
        return len(self._unsaved) + len(self._saving)

    async def room(self) -> None:
        """Wait while the store is up and the backlog is past SAVE_BACKLOG_MAX: the fetch
        worker's backpressure. Bounded by STORE_TIMEOUT_S (a save that hangs is the
        store's timeout to report, not a reason to stop fetching), and never while the
        store is down (the backlog is then held to MEMORY_CACHE_SIZE instead)."""
        self._update_room()
        if self._room.is_set():
            return
        try:
            await asyncio.wait_for(self._room.wait(), self.timeout_s)
        except TimeoutError:
            log.warning("the store saves slower than users are fetched: fetching on")

    def _update_room(self) -> None:
        if self.backlog < SAVE_BACKLOG_MAX or not self._store_ready:
            self._room.set()
        else:
            self._room.clear()

    def held(self, user_id: int) -> UserRecord | None:
        """The copy of a user the store may not have yet (its save failed or is under way)."""
        return self._unsaved.get(user_id) or self._saving.get(user_id)

    async def open(self) -> bool:
        """Open the store; False (and it is logged) when it cannot be opened yet."""
        try:
            await self.store.open()
        except StoreUnavailable as exc:
            log.error("store unavailable at start: %s (retrying in the background)", exc)
            return False
        self.store_ready = True
        return True

    async def reopen(self) -> None:
        """Try to open the store with growing pauses until it opens."""
        attempt = 0
        while not self.store_ready:
            attempt += 1
            await asyncio.sleep(min(30.0, 0.5 * 2 ** min(attempt, 6)))
            try:
                await self.store.open()
            except StoreUnavailable as exc:
                log.warning("store still unavailable: %s", exc)
                continue
            self.store_ready = True
            log.info("store is back")

    async def save(self, records: list[UserRecord]) -> None:
        """Upsert `records` (and any an earlier failed save left), retrying briefly.

        One save at a time: `records` join the unsaved buffer, and whoever holds the turn
        saves the buffer, oldest first, SAVE_MAX_USERS to a transaction, until it is empty
        or the store fails; a caller whose records an earlier turn saved returns at once.
        Concurrent saves (one per batch, as a burst of misses makes) used to queue
        separately on the store's one writer, time out there, and each put every unsaved
        user back for the next to rewrite: 1 000 batches in flight grew a process by
        hundreds of MB in `make bench`. One transaction for the whole buffer then grew
        with the backlog instead: 24 000 users in one upsert timed out, again and again.
        """
        unsaved = self._unsaved
        for record in records:
            unsaved[record.user_id] = record
        async with self._turn:
            while self._unsaved:
                pending = self._take(SAVE_MAX_USERS)
                self._saving |= pending
                try:
                    saved = await self._save(pending)
                finally:
                    for uid, record in pending.items():
                        if self._saving.get(uid) is record:
                            del self._saving[uid]
                    self._update_room()
                if not saved:
                    return  # the rest waits for the next save, as what failed does

    def _take(self, count: int) -> dict[int, UserRecord]:
        """Up to `count` of the unsaved users, the oldest first, out of the buffer."""
        unsaved = self._unsaved
        if len(unsaved) <= count:
            self._unsaved = {}
            return unsaved
        taken = dict(itertools.islice(unsaved.items(), count))
        for uid in taken:
            del unsaved[uid]
        return taken

    async def _save(self, pending: dict[int, UserRecord]) -> bool:
        """Save `pending` with STORE_SAVE_ATTEMPTS tries; False (and the users kept, up to
        MEMORY_CACHE_SIZE) when every try failed. Each try, and what is kept, leaves out
        the users evicted meanwhile (`forget` takes them out of `_saving`): their row was
        deleted, and a retry or the next save would write the evicted copy back."""
        for attempt in range(1, self.attempts + 1):
            users = self._still_saving(pending)
            if not users:
                return True
            try:
                await self.store.upsert_many(users)
            except StoreUnavailable as exc:
                self.stats.store_save_failures += 1
                log.warning(
                    "saving %d users failed (attempt %d/%d): %s",
                    len(users),
                    attempt,
                    self.attempts,
                    exc,
                )
                if attempt < self.attempts:
                    await asyncio.sleep(backoff_s(attempt, 0.1))
                continue
            self.store_ready = True
            log.debug("saved %d users", len(users))
            return True
        self.store_ready = False
        # What failed goes back before what waits (it is older), and the whole buffer is
        # held to the newest MEMORY_CACHE_SIZE: a store down for long must not grow the
        # process without end (memory still holds those users; a dropped one that is
        # asked for again is fetched again).
        unsaved = {r.user_id: r for r in self._still_saving(pending)} | self._unsaved
        dropped = len(unsaved) - self.keep_max
        if dropped > 0:
            unsaved = dict(itertools.islice(unsaved.items(), dropped, None))
            log.warning("the store is down: the %d oldest unsaved users dropped", dropped)
        self._unsaved = unsaved
        return False

    def _still_saving(self, pending: dict[int, UserRecord]) -> list[UserRecord]:
        """The users of `pending` not evicted since the save took them."""
        saving = self._saving
        return [record for uid, record in pending.items() if saving.get(uid) is record]

    async def read(self, user_ids: list[int]) -> dict[int, UserRecord]:
        """Stored users among `user_ids`; raises StoreUnavailable (and marks the store down)."""
        return await self._reached(self.store.get_many(user_ids))

    def read_now(self, user_ids: list[int]) -> dict[int, StoredUser] | None:
        """`read_rendered` with no await where the store can answer so (SQLite: on this
        thread), else None: the caller then awaits `read_rendered`, which reports failures."""
        stored = self.store.read_now(user_ids)
        if stored is not None:
            self.store_ready = True
        return stored

    async def read_rendered(self, user_ids: list[int]) -> dict[int, StoredUser]:
        """Stored users among `user_ids` as lookups answer them (their JSON and
        `fetched_at`); raises StoreUnavailable (and marks the store down).

        Lookups that need the store while a read is on its way go together in the next
        one: one query, and one trip to the store's thread, for all of them. They would
        wait for the read on its way anyway (a connection runs one query at a time), so
        none waits longer; a lookup alone reads at once. One that gives up cancels only
        its own read, never one others wait for.
        """
        reading = self.reading
        for uid in user_ids:
            reading[uid] = reading.get(uid, 0) + 1
        try:
            return await self._shared_read(user_ids)
        finally:
            for uid in user_ids:
                if reading[uid] == 1:
                    del reading[uid]
                else:
                    reading[uid] -= 1

    async def _shared_read(self, user_ids: list[int]) -> dict[int, StoredUser]:
        if not self._reading:
            self._reading = True
            try:
                return await self._query(user_ids)
            finally:
                self._read_next()
        batch = self._next_read
        if batch is None:
            batch = self._next_read = StoreRead(asyncio.get_running_loop().create_future())
        batch.ids.update(user_ids)
        await asyncio.wait([batch.done])
        failure = batch.done.exception()
        if failure is not None:
            raise StoreUnavailable(str(failure))
        stored = batch.done.result()
        return {uid: stored[uid] for uid in user_ids if uid in stored}

    def _read_next(self) -> None:
        """The read on its way has ended: start the one lookups queued meanwhile, if any."""
        batch, self._next_read = self._next_read, None
        if batch is None:
            self._reading = False
            return
        self._read_task = asyncio.create_task(self._read_batch(batch), name="store-read")

    async def _read_batch(self, batch: StoreRead) -> None:
        try:
            batch.done.set_result(await self._query(list(batch.ids)))
        except StoreUnavailable as exc:
            batch.fail(exc)
        except BaseException as exc:
            batch.fail(StoreUnavailable(f"the store read failed: {exc!r}"))
            raise
        finally:
            self._read_next()

    async def _query(self, user_ids: list[int]) -> dict[int, StoredUser]:
        return await self._reached(self.store.get_rendered(user_ids))

    async def _reached(self, read: Awaitable[T]) -> T:
        """A read's answer; a failure is counted and marks the store down, a success up."""
        try:
            answer = await read
        except StoreUnavailable:
            self.stats.store_errors += 1
            self.store_ready = False
            raise
        self.store_ready = True
        return answer

    def forget(self, user_id: int) -> None:
        """Drop an unsaved copy (the user was evicted), and one a save under way is
        writing: its next try, or the next save, leaves it out (see `_save`)."""
        self._unsaved.pop(user_id, None)
        self._saving.pop(user_id, None)

    async def delete(self, user_id: int) -> None:
        """Remove a user Freelancer no longer has; a failure is logged, not raised."""
        self.forget(user_id)
        try:
            await self.store.delete(user_id)
        except StoreUnavailable as exc:
            log.warning("could not remove user %d, gone from Freelancer: %s", user_id, exc)

    async def undo(self, record: UserRecord) -> None:
        """Take back the save of `record`, a copy fetched before its id was evicted: it and
        older copies go, held or stored, but not a copy fetched since (after the eviction,
        a lookup fetched the user again). A failure is logged, not raised."""
        uid, fetched = record.user_id, record.fetched_at
        for held in (self._unsaved, self._saving):
            if uid in held and held[uid].fetched_at <= fetched:
                del held[uid]
        try:
            await self.store.delete(uid, fetched_by=fetched)
        except StoreUnavailable as exc:
            log.warning("could not remove user %d, evicted: %s", uid, exc)
