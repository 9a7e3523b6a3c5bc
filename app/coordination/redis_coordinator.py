"""`RedisCoordinator`: one fetch per id, and one cache, across the deployment's processes.

The lease on an id is an efficiency lock, not a correctness lock: if it fails (a Redis
failover, a partitioned or paused process), Freelancer is asked twice for a user, never
answered wrongly. So one Redis with `SET NX PX` leases is the right tool.

Keys (REDIS_PREFIX `p`; `{id}` is a Redis Cluster hash tag, so an id's keys share a slot
and ids spread over the cluster):

    p:{id}:lease   the process fetching the id (its token), PX FLIGHT_LEASE_S, renewed
    p:{id}:done    the id's last outcome for a few seconds, "fetched_at|json": a process
                   that claims just after the announcement gets the outcome, not the id
    p:events       the one channel: fetches, evictions, clears (JSON, with the sender)
    p:procs        live processes, a sorted set scored by heartbeat time
    p:leader       the process that runs the refresh sweep, a lease renewed by heartbeats
    {p:budget}:*   the shared budget (`app.coordination.redis_budget`)

Every call has REDIS_TIMEOUT_S. When Redis fails, claims fall back to this process alone
(in-process single flight still holds), health says degraded naming REDIS_URL, and after a
short pause Redis is tried again; the subscriber reconnects by itself and then hands
every id still awaited back to the gateway, which claims it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from app.coordination.client import RETRY_AFTER_FAILURE_S, bounded
from app.coordination.wire import (
    decode_event,
    encode_event,
    outcome_from_wire,
    outcome_time,
    outcomes_to_wire,
)
from app.gateway.coordinator import (
    Abandoned,
    CoordinationKind,
    Evicted,
    ExpiredBefore,
    Fetched,
    Listener,
)
from app.gateway.results import Outcome

log = logging.getLogger("app.coordination")

DONE_TTL_MS = 10_000
HEARTBEAT_S = 2.0
LEADER_LEASE_MS = int(HEARTBEAT_S * 3 * 1000)

# KEYS: lease, done. ARGV: token, lease ms. Returns {1} won, {2, outcome} already done,
# {0, pttl} held by another process.
CLAIM = """
local done = redis.call('GET', KEYS[2])
if done then return {2, done} end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1} end
return {0, redis.call('PTTL', KEYS[1])}
"""
# KEYS: lease, done. ARGV: token, "fetched_at|outcome", fetched_at, done ms.
# A newer outcome already there is kept (a late owner loses); our lease is released.
ANNOUNCE = """
local current = redis.call('GET', KEYS[2])
local newer = current and tonumber(string.match(current, '^[^|]*')) > tonumber(ARGV[3])
if not newer then redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4]) end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return newer and 0 or 1
"""
# KEYS: lease. ARGV: token, lease ms. Renews the lease only while we hold it.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class RedisCoordinator:
    """A `Coordinator` over Redis: leases per id, one channel, heartbeats."""

    kind: CoordinationKind = "redis"

    def __init__(self, redis: Redis, *, prefix: str, lease_s: float, timeout_s: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.lease_ms = int(lease_s * 1000)
        self.timeout_s = timeout_s
        self.process = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.listener: Listener | None = None
        self.live_processes = 1
        self.round_trips = 0
        """Redis round trips made for lookups (claims, announcements, cache changes)."""
        self._leading = False
        self._claim = redis.register_script(CLAIM)
        self._announce = redis.register_script(ANNOUNCE)
        self._renew = redis.register_script(RENEW)
        self._held: set[int] = set()
        self._awaited: set[int] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._down_until = 0.0
        self._down_reason: str | None = None
        self._subscribed = asyncio.Event()

    # ---- lifecycle --------------------------------------------------------------------

    async def open(self, listener: Listener) -> None:
        self.listener = listener
        for coro, name in (
            (self._listen(), "redis-subscriber"),
            (self._heartbeat(), "redis-heartbeat"),
            (self._renew_leases(), "redis-lease-renewal"),
        ):
            task = asyncio.create_task(coro, name=name)
            self._tasks.add(task)
        # Subscribe before the first claim (a announcement could otherwise be missed); a
        # Redis that does not answer in time leaves the process in local mode meanwhile.
        try:
            async with asyncio.timeout(self.timeout_s * 4):
                await self._subscribed.wait()
        except TimeoutError:
            log.warning("Redis did not answer at start: coordinating locally until it does")

    async def close(self) -> None:
        for handle in self._timers:
            handle.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        held = sorted(self._held)
        if held and self._usable():
            try:
                # Give the ids back at once: the others need not wait for the leases.
                await self._call(self.redis.delete(*(self._key(uid, "lease") for uid in held)))
                await self._publish(Abandoned(tuple(held)))
            except RedisError:
                pass
        with contextlib.suppress(RedisError):
            await self._call(self.redis.zrem(self._procs, self.process))
        await self.redis.aclose()
        self.listener = None

    # ---- claims and announcements -----------------------------------------------------

    async def claim(self, user_ids: Sequence[int]) -> list[int]:
        if not self._usable():
            return list(user_ids)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for uid in user_ids:
                    keys = [self._key(uid, "lease"), self._key(uid, "done")]
                    await self._claim(keys=keys, args=[self.process, self.lease_ms], client=pipe)
                replies = await self._call(pipe.execute())
        except RedisError as exc:
            self._failed(exc)
            return list(user_ids)
        mine: list[int] = []
        known: dict[int, Outcome] = {}
        waiting: dict[int, int] = {}
        for uid, reply in zip(user_ids, replies, strict=True):
            if reply[0] == 1:
                mine.append(uid)
            elif reply[0] == 2:
                known[uid] = outcome_from_wire_bytes(reply[1])
            else:
                waiting[uid] = int(reply[1])
        self._held.update(mine)
        if known and self.listener is not None:
            self.listener(Fetched(known))
        if waiting:
            self._await(waiting)
        return mine

    async def announce(self, outcomes: Mapping[int, Outcome]) -> None:
        self._held.difference_update(outcomes)
        if not outcomes or not self._usable():
            return
        encoded = outcomes_to_wire(outcomes)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for uid, outcome in outcomes.items():
                    at = outcome_time(outcome)
                    keys = [self._key(uid, "lease"), self._key(uid, "done")]
                    value = b"%r|%s" % (at, encoded[uid])
                    args: list[bytes | str | int] = [self.process, value, repr(at), DONE_TTL_MS]
                    await self._announce(keys=keys, args=args, client=pipe)
                pipe.publish(self._channel, encode_event(self.process, Fetched(outcomes)))
                await self._call(pipe.execute())
        except RedisError as exc:
            self._failed(exc)

    async def publish(self, event: Evicted | ExpiredBefore) -> None:
        if not self._usable():
            return
        try:
            if isinstance(event, Evicted):  # an evicted id's last outcome must not come back
                await self._call(self.redis.delete(*(self._key(u, "done") for u in event.user_ids)))
            await self._publish(event)
        except RedisError as exc:
            self._failed(exc)

    def leads(self) -> bool:
        return self._leading

    def problems(self) -> list[str]:
        if self._down_reason is None:
            return []
        return [f"coordination degraded: Redis unreachable ({self._down_reason}); check REDIS_URL"]

    # ---- waiting for others -----------------------------------------------------------

    def _await(self, pttl_by_id: dict[int, int]) -> None:
        """Ids another process fetches: hand them back when their leases lapse."""
        self._awaited.update(pttl_by_id)
        delay = max(0.01, max(pttl_by_id.values()) / 1000 + 0.01)
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None

        def lapsed() -> None:
            if handle is not None:
                self._timers.discard(handle)
            still = tuple(uid for uid in pttl_by_id if uid in self._awaited)
            self._awaited.difference_update(still)
            if still and self.listener is not None:
                self.listener(Abandoned(still))

        handle = loop.call_later(delay, lapsed)
        self._timers.add(handle)

    def _deliver(self, data: bytes) -> None:
        try:
            sender, event = decode_event(data)
        except ValueError as exc:
            log.warning("ignored a malformed event: %s", exc)
            return
        if sender == self.process or self.listener is None:
            return
        if isinstance(event, Fetched):
            self._awaited.difference_update(event.outcomes)
        self.listener(event)

    async def _listen(self) -> None:
        """The one subscription, recreated whenever its connection fails."""
        attempt = 0
        while True:
            pubsub: PubSub = self.redis.pubsub()
            try:
                await bounded(pubsub.subscribe(self._channel), self.timeout_s)
                if attempt:
                    self._resync()
                    log.info("subscribed to Redis again")
                self._subscribed.set()
                attempt = 0
                last_ping = time.monotonic()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    if message is not None and message["type"] == "message":
                        self._deliver(message["data"])
                    if time.monotonic() - last_ping > HEARTBEAT_S:
                        # A connection to a frozen server stays open: only an answer shows
                        # it is alive.
                        await bounded(pubsub.ping(), self.timeout_s)
                        last_ping = time.monotonic()
            except (RedisError, TimeoutError, OSError) as exc:
                # Only this connection may have failed (claims use others): say so, and
                # let the calls that fail mark Redis down.
                if attempt == 0:
                    log.info("Redis subscription lost (%s); subscribing again", exc)
                attempt += 1
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]
            await asyncio.sleep(min(2.0, 0.1 * 2**attempt))

    def _resync(self) -> None:
        """After a gap in the subscription: whatever was announced meanwhile is lost."""
        awaited = tuple(sorted(self._awaited))
        self._awaited.clear()
        if self.listener is not None:
            # Forget memory (the store has every user; evictions may have been missed),
            # and claim again what was awaited: its outcome is found or it is fetched.
            self.listener(ExpiredBefore(float("inf")))
            if awaited:
                self.listener(Abandoned(awaited))

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            held = list(self._held)
            if not held or not self._usable():
                continue
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for uid in held:
                        await self._renew(
                            keys=[self._key(uid, "lease")],
                            args=[self.process, self.lease_ms],
                            client=pipe,
                        )
                    await bounded(pipe.execute(), self.timeout_s)
            except RedisError as exc:
                self._failed(exc)

    async def _heartbeat(self) -> None:
        while True:
            if self._usable() or time.monotonic() >= self._down_until:
                try:
                    now = time.time()
                    async with self.redis.pipeline(transaction=False) as pipe:
                        pipe.zadd(self._procs, {self.process: now})
                        pipe.zremrangebyscore(self._procs, 0, now - HEARTBEAT_S * 3)
                        pipe.zcard(self._procs)
                        # The leader (who runs the refresh sweep) holds a lease too.
                        pipe.set(self._leader, self.process, nx=True, px=LEADER_LEASE_MS)
                        pipe.get(self._leader)
                        replies = await bounded(pipe.execute(), self.timeout_s)
                    self.live_processes = max(1, int(replies[2]))
                    self._leading = replies[4] == self.process.encode()
                    if self._leading:
                        await bounded(
                            self.redis.pexpire(self._leader, LEADER_LEASE_MS), self.timeout_s
                        )
                    self._recovered()
                except RedisError as exc:
                    self._failed(exc)
            await asyncio.sleep(HEARTBEAT_S)

    # ---- plumbing ---------------------------------------------------------------------

    async def _publish(self, event: Evicted | ExpiredBefore | Abandoned) -> None:
        await self._call(self.redis.publish(self._channel, encode_event(self.process, event)))

    async def _call(self, awaitable: Awaitable[Any]) -> Any:
        self.round_trips += 1
        return await bounded(awaitable, self.timeout_s)

    def _usable(self) -> bool:
        return self._down_reason is None or time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException) -> None:
        reason = str(exc) or type(exc).__name__
        if self._down_reason is None:
            log.warning("Redis failed (%s): coordinating locally until it answers", reason)
        self._down_reason = reason[:120]
        self._down_until = time.monotonic() + RETRY_AFTER_FAILURE_S

    def _recovered(self) -> None:
        if self._down_reason is not None:
            log.info("Redis answers again: coordinating across processes")
            self._down_reason = None

    def _key(self, uid: int, what: str) -> str:
        return f"{self.prefix}:{{{uid}}}:{what}"

    @property
    def _channel(self) -> str:
        return f"{self.prefix}:events"

    @property
    def _procs(self) -> str:
        return f"{self.prefix}:procs"

    @property
    def _leader(self) -> str:
        return f"{self.prefix}:leader"


def outcome_from_wire_bytes(value: bytes) -> Outcome:
    """The outcome kept in a `done` key ("fetched_at|json")."""
    return outcome_from_wire(orjson.loads(value.split(b"|", 1)[1]))
