"""Cache administration: evictions, clearing expired users, revalidation and the sweep."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from app.errors import StoreUnavailable
from app.gateway.batching import PRIORITY_SWEEP
from app.gateway.cache import record_of
from app.gateway.coordinator import Evicted, ExpiredBefore

if TYPE_CHECKING:
    from app.gateway.gateway import Gateway

log = logging.getLogger("app.gateway")


class CacheAdmin:
    """What operators do to a gateway's cache; each change reaches every process."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def evict(self, user_id: int) -> bool:
        """Forget one user everywhere (store, memory, negative caches); True if it was known."""
        gateway = self.gateway
        in_store = await gateway.store.delete(user_id)
        known = gateway.forget(user_id)
        await gateway.coordinator.publish(Evicted((user_id,)))
        return in_store or known

    async def clear_expired(self) -> int:
        """Remove users past CACHE_TTL_S + STALE_IF_ERROR_S from store and memory."""
        gateway, settings = self.gateway, self.gateway.settings
        cutoff = gateway.clock() - settings.cache_ttl_s - settings.stale_if_error_s
        removed = await gateway.store.delete_fetched_before(cutoff)
        gateway.memory.expire_before(cutoff)
        await gateway.coordinator.publish(ExpiredBefore(cutoff))
        return removed

    async def revalidate(self, user_ids: Sequence[int]) -> int:
        """Queue background refreshes of these ids (uncached ones are prefetched)."""
        gateway = self.gateway
        users = gateway.memory.users
        stored = await gateway.writes.read([u for u in user_ids if u not in users])
        now = gateway.clock()
        queued = 0
        for uid in user_ids:
            entry = users.get(uid)
            record = record_of(entry) if entry is not None else stored.get(uid)
            queued += gateway.schedule_refresh(uid, record, PRIORITY_SWEEP, now)
        return queued

    async def revalidate_older_than(self, age_s: float, *, leader_only: bool = False) -> int:
        """Queue refreshes of stored users fetched more than `age_s` ago, as room allows;
        `leader_only` (the sweep): each dropped if this process stops leading before its
        call goes (the new leader sweeps)."""
        gateway = self.gateway
        room = gateway.queue.room_for(PRIORITY_SWEEP)
        if room <= 0:
            return 0
        try:
            records = await gateway.store.fetched_before(gateway.clock() - age_s, limit=room)
        except StoreUnavailable:
            gateway.stats.store_errors += 1
            raise
        now = gateway.clock()
        queued = 0
        for record in records:
            if gateway.schedule_refresh(record.user_id, record, PRIORITY_SWEEP, now):
                gateway.inflight[record.user_id].leader_only = leader_only
                queued += 1
        return queued

    async def sweep(self) -> None:
        """Every REFRESH_INTERVAL_S, refresh users that will turn stale before the next one."""
        while True:
            await asyncio.sleep(self.gateway.settings.refresh_interval_s)
            await self.sweep_once()

    async def sweep_once(self) -> int:
        """One sweep, on the leader only; how many users it queued."""
        if not self.gateway.coordinator.leads():
            return 0  # another process of the deployment sweeps
        settings = self.gateway.settings
        try:
            queued = await self.revalidate_older_than(
                settings.cache_ttl_s - settings.refresh_interval_s, leader_only=True
            )
        except StoreUnavailable as exc:
            log.warning("refresh sweep skipped: %s", exc)
            return 0
        if queued:
            log.info("refresh sweep queued %d users", queued)
        return queued
