"""What this process still owes Redis: announcements, lease releases, evictions, in order.

Nothing the other processes rely on is skipped because Redis failed a moment ago: each
change is queued here first and sent in order as soon as Redis answers (a failed send
stays at the head and is tried again). The queue is bounded by the ids it holds; on
overflow what it held is replaced by one "drop your memory" broadcast (every process
forgets its in-memory users; the store still has them all): the queued evictions are
covered by it, and the queued announcements and releases are covered by their leases,
which lapse by themselves within FLIGHT_LEASE_S.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from redis.asyncio.client import Pipeline

from app.coordination import scripts
from app.coordination.wire import (
    EVICTED,
    done_value,
    encode_event,
    outcome_time,
    outcomes_to_wire,
)
from app.gateway.coordinator import Abandoned, Evicted, ExpiredBefore, Fetched
from app.gateway.results import NOT_FOUND, Failure, Outcome

log = logging.getLogger("app.coordination")

RunPipeline = Callable[[Callable[[Pipeline], Any]], Awaitable[Any]]
"""Runs the commands a builder queues on a pipeline, in one bounded round trip."""

OpKind = Literal["announce", "publish", "release", "evict", "event"]

FORGET_EVERYTHING = ExpiredBefore(float("inf"))
"""The broadcast that replaces an overflowed queue: every user in memory is dropped."""


@dataclass(slots=True)
class Op:
    """One change to send.

    announce: outcomes of ids this process fetched (`tokens`: the lease token of each id,
    "" where it took none), to write to their `done` keys, then `publish`ed as far as the
    fencing kept them; release: leases given back unfetched (announced as abandoned);
    evict: evicted ids (their `done` keys marked at `at`); event: a cache clear.
    """

    kind: OpKind
    ids: tuple[int, ...] = ()
    tokens: tuple[str, ...] = ()
    outcomes: Mapping[int, Outcome] = field(default_factory=dict)
    at: float = 0.0
    """Wall-clock time of the change (fencing of not-found, failures and evictions)."""
    event: ExpiredBefore | None = None
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        return max(1, len(self.ids))


class Outbox:
    """A FIFO of `Op`s bounded by the ids it holds, and how each is sent."""

    def __init__(
        self,
        max_ids: int,
        *,
        keys: scripts.Keys,
        process: str,
        done_ms: int,
        not_found_ms: int = 0,
        pipeline: RunPipeline,
        evicted: Callable[[tuple[int, ...]], None],
    ) -> None:
        self.max_ids = max_ids
        self.evicted = evicted
        """Told of ids whose announced outcome an eviction made since refused: this
        process may have saved the older copy after the eviction cleared the store."""
        self.keys = keys
        self.process = process
        self.done_ms = done_ms
        self.not_found_ms = max(done_ms, not_found_ms)
        """How long a not-found outcome is handed to claims: as long as each process
        remembers it (NOT_FOUND_TTL_S), since no store keeps it."""
        self.pipeline = pipeline
        self.ops: deque[Op] = deque()
        self.ids = 0
        self.overflows = 0

    def __len__(self) -> int:
        return len(self.ops)

    def put(self, op: Op) -> None:
        """Queue `op`; past the bound, everything queued becomes one "drop your memory"."""
        if self.ids + op.size > self.max_ids:
            self.overflows += 1
            log.warning(
                "%d changes for Redis queued (%d ids): replaced by one 'drop your memory'",
                len(self.ops),
                self.ids,
            )
            self.ops.clear()
            self.ids = 0
            self._append(Op("event", event=FORGET_EVERYTHING))
        self._append(op)

    def head(self) -> Op:
        return self.ops[0]

    def done(self, op: Op, then: Op | None = None) -> None:
        """`op` (the head) was sent; `then` (its follow-up) goes first next."""
        if self.ops and self.ops[0] is op:
            self.ops.popleft()
            self.ids -= op.size
        if then is not None:
            self.ops.appendleft(then)
            self.ids += then.size

    async def send(self, op: Op) -> Op | None:
        """One queued change, in one round trip; returns what must follow it."""
        if op.kind == "announce":
            return await self._send_announcement(op)
        if op.kind == "publish":
            await self._publish(Fetched(op.outcomes))
        elif op.kind == "event":
            assert op.event is not None
            await self._publish(op.event)
        elif op.kind == "release":

            def release(pipe: Pipeline) -> None:
                for uid, token in zip(op.ids, op.tokens, strict=True):
                    scripts.call(pipe, scripts.RELEASE, [self.keys.lease(uid)], [token])
                pipe.publish(self.keys.channel, encode_event(self.process, Abandoned(op.ids)))

            await self.pipeline(release)
        else:  # an eviction: outcomes learnt before it are not handed out again

            def evict(pipe: Pipeline) -> None:
                mark = done_value(op.at, EVICTED)
                for uid in op.ids:
                    keys = [self.keys.done(uid)]
                    scripts.call(pipe, scripts.EVICT, keys, [mark, repr(op.at), self.done_ms])
                pipe.publish(self.keys.channel, encode_event(self.process, Evicted(op.ids)))

            await self.pipeline(evict)
        return None

    async def _send_announcement(self, op: Op) -> Op | None:
        """Write the outcomes and release the leases; publish only what the fencing kept
        (a late owner's refused outcome must not reach anyone)."""
        stale = time.monotonic() - op.queued_at > self.done_ms / 1000
        encoded = outcomes_to_wire(op.outcomes)

        def build(pipe: Pipeline) -> None:
            for uid, token in zip(op.ids, op.tokens, strict=True):
                lease = self.keys.lease(uid)
                if stale:  # queued so long that every waiter gave up on it: release only
                    scripts.call(pipe, scripts.RELEASE, [lease], [token])
                    continue
                outcome = op.outcomes[uid]
                at = outcome_time(outcome, op.at)
                failed = isinstance(outcome, Failure) and outcome != NOT_FOUND
                value = done_value(at, encoded[uid])
                keep_ms = self.not_found_ms if outcome == NOT_FOUND else self.done_ms
                args = [token, value, repr(at), keep_ms, "f" if failed else ""]
                scripts.call(pipe, scripts.ANNOUNCE, [lease, self.keys.done(uid)], args)

        replies = await self.pipeline(build)
        if stale:
            return None
        kept = {uid: op.outcomes[uid] for uid, ok in zip(op.ids, replies, strict=True) if ok == 1}
        if evicted := tuple(uid for uid, ok in zip(op.ids, replies, strict=True) if ok == 2):
            self.evicted(evicted)
        return Op("publish", outcomes=kept) if kept else None

    async def _publish(self, event: Fetched | Evicted | ExpiredBefore | Abandoned) -> None:
        message = encode_event(self.process, event)
        await self.pipeline(lambda pipe: pipe.publish(self.keys.channel, message))

    def _append(self, op: Op) -> None:
        self.ops.append(op)
        self.ids += op.size
