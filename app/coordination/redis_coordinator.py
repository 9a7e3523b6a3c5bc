"""`RedisCoordinator`: one fetch per id, and one cache, across the deployment's processes.

The lease on an id is an efficiency lock, not a correctness lock: if it fails (a Redis
failover, a partitioned or paused process), Freelancer is asked twice for a user, never
answered wrongly. So one Redis with `SET NX PX` leases is the right tool.

Keys (REDIS_PREFIX `p`; `{id}` is a Redis Cluster hash tag, so an id's keys share a slot
and ids spread over the cluster):

    p:{id}:lease   the process fetching the id (a token per claim), PX FLIGHT_LEASE_S,
                   renewed while the fetch runs, released token-guarded
    p:{id}:done    the id's last outcome, "time|json", for twice FLIGHT_LEASE_S (10 s at
                   least; a not-found for NOT_FOUND_TTL_S, as no store keeps it): a
                   claim in that time gets the outcome, not the id; after an eviction,
                   the eviction's time (older outcomes are refused)
    p:events       the one channel: fetches, evictions, clears (JSON, with the sender)
    p:procs        live processes, a sorted set scored by heartbeat time
    p:leader       the process that runs the sweep and the jobs (`Presence`)
    p:lease:<name> one process's hold on some work (a job's callback)
    {p:budget}:*   the shared budget (`app.coordination.redis_budget`)

A batch costs three round trips: the claim, the announcement (the `done` keys written,
the leases released), the publication of what the fencing kept. Announcements, releases
and evictions go through an `Outbox`: never skipped while Redis is marked down, sent in
order once it answers. Every call has REDIS_TIMEOUT_S. While Redis fails, claims fall
back to this process alone (in-process single flight holds) and health says degraded
naming REDIS_URL; the subscription (`Subscriber`) checks its own link.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError, RedisError

from app.coordination import scripts
from app.coordination.client import RETRY_AFTER_FAILURE_S, bounded, keep_running, stop_tasks
from app.coordination.outbox import Op, Outbox
from app.coordination.presence import Presence
from app.coordination.scripts import Keys
from app.coordination.subscriber import Subscriber
from app.coordination.wire import decode_event, outcome_from_done
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

DONE_MIN_MS = 10_000
OUTBOX_MAX_IDS = 20_000


class RedisCoordinator:
    """A `Coordinator` over Redis: leases per id, one channel, heartbeats."""

    kind: CoordinationKind = "redis"

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        lease_s: float,
        timeout_s: float,
        not_found_ttl_s: float = 0.0,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.lease_ms = int(lease_s * 1000)
        self.done_ms = max(DONE_MIN_MS, 2 * self.lease_ms)
        self.timeout_s = timeout_s
        self.process = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.listener: Listener | None = None
        self.round_trips = 0
        """Redis round trips made for lookups and cache changes (not heartbeats/renewals)."""
        self.keys = Keys(prefix)
        self.outbox = Outbox(
            OUTBOX_MAX_IDS,
            keys=self.keys,
            process=self.process,
            done_ms=self.done_ms,
            not_found_ms=int(not_found_ttl_s * 1000),
            pipeline=self._pipeline,
            evicted=lambda ids: self.listener and self.listener(Evicted(ids)),
        )
        self._claims = itertools.count(1)
        self._held: dict[int, str] = {}
        """Ids this process fetches (or may hold a lease on), with their lease token."""
        self._awaited: set[int] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._down_until = 0.0
        self._down_reason: str | None = None
        self._flushing = asyncio.Lock()
        self._wake_sender = asyncio.Event()
        self.presence = Presence(
            self.keys,
            self.process,
            pipeline=lambda build: self._pipeline(build, counted=False),
            answered=self._answered,
            failed=self._failed,
        )
        self.subscriber = Subscriber(
            redis,
            self.keys.channel,
            timeout_s=timeout_s,
            on_message=self._deliver,
            on_confirmed=self._confirmed,
        )

    @property
    def live_processes(self) -> int:
        return self.presence.live_processes

    # ---- lifecycle --------------------------------------------------------------------

    async def open(self, listener: Listener) -> None:
        self.listener = listener
        try:
            await bounded(scripts.load(self.redis), self.timeout_s)
        except RedisError as exc:  # loaded on first use instead (a NOSCRIPT answer)
            self._failed(exc)
        for coro, name in (
            (self.subscriber.run(), "redis-subscriber"),
            (keep_running(self.presence.run, "heartbeat"), "redis-heartbeat"),
            (keep_running(self._renew_leases, "lease renewal"), "redis-lease-renewal"),
            (keep_running(self._send_pending, "sender"), "redis-sender"),
        ):
            self._tasks.add(asyncio.create_task(coro, name=name))
        # Subscribed before the first claim (an announcement could otherwise be missed); a
        # Redis that does not confirm in time leaves the process in local mode meanwhile.
        try:
            async with asyncio.timeout(self.timeout_s * 4):
                await self.subscriber.subscribed.wait()
        except TimeoutError:
            log.warning("Redis did not answer at start: coordinating locally until it does")

    async def close(self) -> None:
        for handle in self._timers:
            handle.cancel()
        await stop_tasks(self._tasks)
        if self._held:  # give the ids back at once: the others need not wait for leases
            ids, tokens = zip(*sorted(self._held.items()), strict=True)
            self._held.clear()
            self.outbox.put(Op("release", ids, tokens))
        try:  # token-guarded, so tried even while Redis is marked down
            async with asyncio.timeout(self.timeout_s * 4):
                await self._flush()
                await self._pipeline(self.presence.leave, counted=False)
        except (RedisError, TimeoutError) as exc:
            if self.outbox:
                log.warning("closing: %d changes not sent to Redis (%s)", len(self.outbox), exc)
        await self.redis.aclose()
        self.listener = None

    # ---- claims and announcements -----------------------------------------------------

    async def claim(self, user_ids: Sequence[int]) -> list[int]:
        if not self._usable():
            return list(user_ids)
        token = f"{self.process}.{next(self._claims)}"
        prefix = f"{self.process}."

        def build(pipe: Pipeline) -> None:
            for uid in user_ids:
                keys = [self.keys.lease(uid), self.keys.done(uid)]
                scripts.call(pipe, scripts.CLAIM, keys, [token, self.lease_ms, prefix])

        try:
            replies = await self._pipeline(build)
        except RedisError as exc:
            self._failed(exc)
            # Redis may have run the claim before its answer was lost: such leases carry
            # `token`, so the announcement of these ids (this process fetches them now)
            # releases them, and they are renewed meanwhile like any other.
            self._held.update(dict.fromkeys(user_ids, token))
            return list(user_ids)
        mine: list[int] = []
        known: dict[int, Outcome] = {}
        waiting: dict[int, int] = {}
        for uid, reply in zip(user_ids, replies, strict=True):
            if reply[0] == 1:
                mine.append(uid)
                self._held[uid] = token
            elif reply[0] == 2 and (outcome := outcome_from_done(reply[1])) is not None:
                known[uid] = outcome
            else:
                waiting[uid] = int(reply[1])
        if known and self.listener is not None:
            self.listener(Fetched(known))
        if waiting:
            self._await(waiting)
        return mine

    async def announce(self, outcomes: Mapping[int, Outcome]) -> None:
        if not outcomes:
            return
        ids = tuple(outcomes)
        tokens = tuple(self._held.pop(uid, "") for uid in ids)
        self.outbox.put(Op("announce", ids, tokens, dict(outcomes), at=time.time()))
        await self._send_now()

    async def publish(self, event: Evicted | ExpiredBefore) -> None:
        if isinstance(event, Evicted):
            self.outbox.put(Op("evict", tuple(event.user_ids), at=time.time()))
        else:
            self.outbox.put(Op("event", event=event))
        await self._send_now()

    def leads(self) -> bool:
        return self.presence.leads()

    async def hold(self, name: str, ttl_s: float) -> str | None:
        return await self.presence.hold(name, ttl_s)

    async def holds(self, name: str, token: str) -> bool:
        return await self.presence.holds(name, token)

    async def drop(self, name: str, token: str) -> None:
        await self.presence.drop(name, token)

    def problems(self) -> list[str]:
        found = []
        if self._down_reason is not None:
            queued = f"; {len(self.outbox)} changes queued for it" if self.outbox else ""
            found.append(
                f"coordination degraded: Redis unreachable ({self._down_reason}){queued}; "
                "check REDIS_URL"
            )
        if self.subscriber.problem is not None:
            found.append(
                f"coordination degraded: not subscribed to Redis' events "
                f"({self.subscriber.problem}); check REDIS_URL"
            )
        return found

    # ---- sending what is owed ---------------------------------------------------------

    async def _send_now(self) -> None:
        """Send what is queued now, unless Redis failed a moment ago (then the sender
        keeps trying in the background)."""
        if self._usable():
            await self._flush()
        else:
            self._wake_sender.set()

    async def _send_pending(self) -> None:
        """Try again, with growing pauses, until everything queued is sent."""
        failures = 0
        while True:
            if not self.outbox:
                failures = 0
                self._wake_sender.clear()
                await self._wake_sender.wait()
            if await self._flush():
                failures = 0
            else:
                failures += 1
                await asyncio.sleep(min(1.0, 0.05 * 2**failures))

    async def _flush(self) -> bool:
        """Send the queue in order; False when Redis failed (what is left stays queued)."""
        async with self._flushing:
            while self.outbox:
                op = self.outbox.head()
                try:
                    then = await self.outbox.send(op)
                except RedisError as exc:
                    self._failed(exc)
                    self._wake_sender.set()  # the sender tries again, whatever the caller
                    return False
                self.outbox.done(op, then)
            self._recovered()
            return True

    async def _pipeline(self, build: Callable[[Pipeline], Any], *, counted: bool = True) -> Any:
        """Run the commands `build` queues, in one round trip (two more, once, if Redis
        lost the scripts: a restart)."""
        for attempt in (1, 2):
            async with self.redis.pipeline(transaction=False) as pipe:
                build(pipe)
                self.round_trips += counted
                try:
                    return await bounded(pipe.execute(), self.timeout_s)
                except NoScriptError:
                    if attempt == 2:
                        raise
            self.round_trips += counted
            await bounded(scripts.load(self.redis), self.timeout_s)
        raise AssertionError("unreachable")

    # ---- waiting for others -----------------------------------------------------------

    def _await(self, pttl_by_id: dict[int, int]) -> None:
        """Ids another process fetches: hand them back when their leases lapse."""
        self._awaited.update(pttl_by_id)
        delay = max(0.01, max(pttl_by_id.values()) / 1000 + 0.01)
        handle: asyncio.TimerHandle | None = None

        def lapsed() -> None:
            if handle is not None:
                self._timers.discard(handle)
            still = tuple(uid for uid in pttl_by_id if uid in self._awaited)
            self._awaited.difference_update(still)
            if still and self.listener is not None:
                self.listener(Abandoned(still))

        handle = asyncio.get_running_loop().call_later(delay, lapsed)
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

    def _confirmed(self) -> None:
        """Subscribed (again): whatever was announced while the link was down is lost."""
        awaited = tuple(sorted(self._awaited))
        self._awaited.clear()
        if self.listener is None:
            return
        if self.subscriber.confirmations > 1:
            # Forget memory (the store has every user; evictions may have been missed).
            log.info("subscribed to Redis again")
            self.listener(ExpiredBefore(float("inf")))
        if awaited:  # claimed again: the outcome is found, or the id is fetched
            self.listener(Abandoned(awaited))

    # ---- background loops -------------------------------------------------------------

    async def _renew_leases(self) -> None:
        """Renew held leases every third of a lease; after a failure, try again soon (the
        client's down mark does not apply): a lease lapses only after a whole lease
        without one renewal."""
        every_s = self.lease_ms / 3000
        retry_s = min(every_s, max(0.1, self.timeout_s / 2))
        wait_s = every_s
        while True:
            await asyncio.sleep(wait_s)
            held = list(self._held.items())
            wait_s = every_s
            if not held:
                continue

            def renew(pipe: Pipeline, held: list[tuple[int, str]] = held) -> None:
                for uid, token in held:
                    keys = [self.keys.lease(uid)]
                    scripts.call(pipe, scripts.RENEW, keys, [token, self.lease_ms])

            try:
                await self._pipeline(renew, counted=False)
            except RedisError as exc:
                self._failed(exc)
                wait_s = retry_s

    # ---- plumbing ---------------------------------------------------------------------

    def _usable(self) -> bool:
        return self._down_reason is None or time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException) -> None:
        reason = str(exc) or type(exc).__name__
        if self._down_reason is None:
            log.warning("Redis failed (%s): coordinating locally until it answers", reason)
        self._down_reason = reason[:120]
        self._down_until = time.monotonic() + RETRY_AFTER_FAILURE_S

    def _answered(self) -> None:
        """Redis answered a heartbeat: it is back, and what is queued can go."""
        self._recovered()
        if self.outbox:
            self._wake_sender.set()

    def _recovered(self) -> None:
        if self._down_reason is not None:
            log.info("Redis answers again: coordinating across processes")
            self._down_reason = None
