"""Which processes of the deployment are alive, which one leads (runs the sweep and the
jobs), and who holds a piece of one-process work (a job's callback): heartbeats into a
sorted set, a leader lease renewed with them, named leases.

The leader keeps leading only until LEAD_MARGIN_S before the lease set by its last
renewal that succeeded could lapse, counted from when that renewal was *sent*: a process
cut off from Redis (or paused) stops leading before another can start, instead of
running the sweep and the jobs beside the new leader.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable

from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from app.coordination import scripts
from app.coordination.outbox import RunPipeline

HEARTBEAT_S = 2.0
LEADER_LEASE_MS = int(HEARTBEAT_S * 3 * 1000)
LEAD_MARGIN_S = 1.0


class Presence:
    """Heartbeats for one process: the live count, and the lead."""

    def __init__(
        self,
        keys: scripts.Keys,
        process: str,
        *,
        pipeline: RunPipeline,
        answered: Callable[[], None],
        failed: Callable[[BaseException], None],
    ) -> None:
        self.keys = keys
        self.process = process
        self.pipeline = pipeline
        self.answered = answered
        self.failed = failed
        self.live_processes = 1
        self.lead_until = 0.0

    def leads(self) -> bool:
        return time.monotonic() < self.lead_until

    async def run(self) -> None:
        """Beat every HEARTBEAT_S (whether or not Redis failed lately: this is how its
        return is noticed)."""
        while True:
            await self.beat()
            await asyncio.sleep(HEARTBEAT_S)

    async def beat(self) -> None:
        sent = time.monotonic()
        now = time.time()
        keys = self.keys

        def build(pipe: Pipeline) -> None:
            pipe.zadd(keys.procs, {self.process: now})
            pipe.zremrangebyscore(keys.procs, 0, now - HEARTBEAT_S * 3)
            pipe.zcard(keys.procs)
            scripts.call(pipe, scripts.HOLD, [keys.leader], [self.process, LEADER_LEASE_MS])

        try:
            replies = await self.pipeline(build)
        except RedisError as exc:
            self.failed(exc)
            return
        self.live_processes = max(1, int(replies[2]))
        held_s = LEADER_LEASE_MS / 1000 - LEAD_MARGIN_S
        self.lead_until = sent + held_s if replies[3] == 1 else 0.0
        self.answered()

    async def hold(self, name: str, ttl_s: float) -> str | None:
        """A named lease for `ttl_s` (`SET NX PX`): its token, or None (held elsewhere, or
        Redis failed: then nobody here does the work now)."""
        token = secrets.token_hex(8)
        key, ms = self.keys.lease_named(name), int(ttl_s * 1000)
        try:
            [taken] = await self.pipeline(lambda pipe: pipe.set(key, token, nx=True, px=ms))
        except RedisError as exc:
            self.failed(exc)
            return None
        return token if taken else None

    async def holds(self, name: str, token: str) -> bool:
        key = self.keys.lease_named(name)
        try:
            [held] = await self.pipeline(lambda pipe: pipe.get(key))
        except RedisError as exc:
            self.failed(exc)
            return False
        return bool(held == token.encode())

    async def drop(self, name: str, token: str) -> None:
        """Give a named lease back, token-guarded (a failure leaves it to lapse)."""
        key = self.keys.lease_named(name)
        try:
            await self.pipeline(lambda pipe: scripts.call(pipe, scripts.RELEASE, [key], [token]))
        except RedisError as exc:
            self.failed(exc)

    def leave(self, pipe: Pipeline) -> None:
        """Queue this process's goodbye: out of the live set, the lead given back."""
        pipe.zrem(self.keys.procs, self.process)
        if self.lead_until:
            scripts.call(pipe, scripts.RELEASE, [self.keys.leader], [self.process])
        self.lead_until = 0.0
