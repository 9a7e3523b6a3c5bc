"""`RedisPopularity`: the deployment's popularity, each process's counts merged in Redis.

Every refresh-ahead look (a few seconds, off the hot path), each process replaces its own
snapshot, a sorted set of its most asked ids and their counts that lapses unless renewed,
and lists itself; the leading process then sums the live snapshots with ZUNIONSTORE and
reads those at or above the threshold. Each process decays its own counts, so the sum
decays with them, and a dead process's counts lapse with its snapshot. Two round trips a
look (one for a process that does not lead); a Redis that fails leaves each process with
its own counts (logged), never an error on a lookup.

Keys (REDIS_PREFIX `p`; one hash tag, so ZUNIONSTORE works on Redis Cluster too):

    {p:pop}:of:<process>  one process's counts, PX SNAPSHOT_TTL_MS
    {p:pop}:procs         processes that shared, scored by when (ms, Redis' clock: a
                          process whose clock runs ahead must not prune the others)
    {p:pop}:merged        the leader's sum, rewritten each look
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.coordination.client import bounded

log = logging.getLogger("app.coordination")

SNAPSHOT_TTL_MS = 30_000
"""A snapshot not renewed for this long is some dead process's: left out of the sum."""
LIST_MYSELF = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
"""
"""List this process, and prune those silent for ARGV[2] ms, on Redis' clock (`TIME`)."""


class RedisPopularity:
    """A `PopularityShare` over Redis (see the module docstring)."""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        process: str,
        timeout_s: float,
        leads: Callable[[], bool],
        top: int = 5000,
    ) -> None:
        self.redis = redis
        tag = f"{{{prefix}:pop}}"
        self.mine_key = f"{tag}:of:{process}"
        self.procs_key = f"{tag}:procs"
        self.merged_key = f"{tag}:merged"
        self.tag = tag
        self.process = process
        self.timeout_s = timeout_s
        self.leads = leads
        self.top = top

    async def merge(self, mine: Mapping[int, int], *, min_hits: int) -> dict[int, int]:
        own = {u: c for u, c in mine.items() if c >= min_hits}
        try:
            await bounded(self._share(mine), self.timeout_s)
            if not self.leads():
                return own
            merged: dict[int, int] = await bounded(self._merged(min_hits), self.timeout_s)
        except (RedisError, TimeoutError) as exc:
            log.warning("popularity not shared through Redis (%s): own counts only", exc)
            return own
        return merged

    async def _share(self, mine: Mapping[int, int]) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.mine_key)
            if mine:
                pipe.zadd(self.mine_key, {str(u): c for u, c in mine.items()})
                pipe.pexpire(self.mine_key, SNAPSHOT_TTL_MS)
            # Each process's own clock pruned the others' entries: one running minutes
            # ahead dropped every other process from the sum (tests/gateway/
            # test_refresh_ahead_redteam3.py).
            pipe.eval(LIST_MYSELF, 1, self.procs_key, self.process, 10 * SNAPSHOT_TTL_MS)
            await pipe.execute()

    async def _merged(self, min_hits: int) -> dict[int, int]:
        procs = await self.redis.zrange(self.procs_key, 0, -1)
        keys = [f"{self.tag}:of:{p.decode() if isinstance(p, bytes) else p}" for p in procs]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zunionstore(self.merged_key, keys or [self.mine_key])
            pipe.zrange(
                self.merged_key, "+inf", min_hits, desc=True, byscore=True,
                offset=0, num=self.top, withscores=True,
            )  # fmt: skip
            _, rows = await pipe.execute()
        return {int(member): int(score) for member, score in rows}
