"""The gateway's edge to the store: reads, saves after waiters have their answer, store health.

Waiters are answered before the save, so a slow or failing store never holds them up.
A save is retried briefly; what still failed is kept (bounded) and written with the next
batch. While the store cannot be opened it is reopened in the background.
"""

from __future__ import annotations

import asyncio
import logging

from app.config import Settings
from app.domain import StoredUser, UserRecord
from app.errors import StoreUnavailable
from app.gateway.resilient import backoff_s
from app.gateway.stats import GatewayStats
from app.store.base import UserStore

log = logging.getLogger("app.gateway")


class WriteBehind:
    """Saves records with STORE_SAVE_ATTEMPTS tries; keeps up to MEMORY_CACHE_SIZE unsaved."""

    def __init__(self, store: UserStore, *, stats: GatewayStats, settings: Settings) -> None:
        self.store = store
        self.stats = stats
        self.attempts = settings.store_save_attempts
        self.keep_max = settings.memory_cache_size
        self.store_ready = False
        self._unsaved: dict[int, UserRecord] = {}

    @property
    def pending(self) -> bool:
        """True while some fetched users wait for a save that succeeds."""
        return bool(self._unsaved)

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
        """Upsert `records` (and any an earlier failed save left), retrying briefly."""
        pending = {**self._unsaved, **{r.user_id: r for r in records}}
        self._unsaved = {}
        for attempt in range(1, self.attempts + 1):
            try:
                await self.store.upsert_many(list(pending.values()))
            except StoreUnavailable as exc:
                self.stats.store_save_failures += 1
                log.warning(
                    "saving %d users failed (attempt %d/%d): %s",
                    len(pending),
                    attempt,
                    self.attempts,
                    exc,
                )
                if attempt < self.attempts:
                    await asyncio.sleep(backoff_s(attempt, 0.1))
                continue
            self.store_ready = True
            log.debug("saved %d users", len(pending))
            return
        self.store_ready = False
        keep = list(pending.items())[-self.keep_max :]
        self._unsaved = dict(keep) | self._unsaved

    async def read(self, user_ids: list[int]) -> dict[int, UserRecord]:
        """Stored users among `user_ids`; raises StoreUnavailable (and marks the store down)."""
        try:
            stored = await self.store.get_many(user_ids)
        except StoreUnavailable:
            self.stats.store_errors += 1
            self.store_ready = False
            raise
        self.store_ready = True
        return stored

    async def read_rendered(self, user_ids: list[int]) -> dict[int, StoredUser]:
        """Stored users among `user_ids` as lookups answer them (their JSON and
        `fetched_at`); raises StoreUnavailable (and marks the store down)."""
        try:
            stored = await self.store.get_rendered(user_ids)
        except StoreUnavailable:
            self.stats.store_errors += 1
            self.store_ready = False
            raise
        self.store_ready = True
        return stored

    def forget(self, user_id: int) -> None:
        """Drop an unsaved copy (the user was evicted)."""
        self._unsaved.pop(user_id, None)

    async def delete(self, user_id: int) -> None:
        """Remove a user Freelancer no longer has; a failure is logged, not raised."""
        self.forget(user_id)
        try:
            await self.store.delete(user_id)
        except StoreUnavailable as exc:
            log.warning("could not remove user %d, gone from Freelancer: %s", user_id, exc)
