"""`RedisBudget`: the budget's sliding log shared by every process, in one Lua script.

Keys (one hash tag, so one Redis Cluster slot): `{p:budget}:log`, every call of the
longest window as a sorted set (score: the call's time in whole ms, rounded up; member:
its ticket), `{p:budget}:lane:<lane>` the same calls by lane (for the lanes' shares),
`{p:budget}:paused`, the ms until which a 429 stops everyone, and `{p:budget}:epoch`,
which changes when the log was lost. The scripts are `app.coordination.budget_scripts`.

What holds across processes, and how:

- **Never over a limit while Redis answers.** Every call is checked and logged by one
  script (`BUDGET`) that reads Redis' clock (`TIME`), trims the log, counts each window
  and logs the call only if every window holds fewer calls than the lane's ceiling (its
  limit less its reserve). Redis runs scripts one at a time, so no two processes can both
  take the last call of a window, and the processes' own clocks never matter. All of it
  is integer milliseconds; the reply is integers with an explicit "granted" index.
- **A lane's reserve is deployment-wide** for the same reason: the ceiling is checked in
  the script against every process's calls. Pacing and the order of lanes are each
  process's own policy (`app.gateway.planner`); jobs run on the leader only, so theirs is
  the deployment's.
- **While Redis is away**, each process falls back to a local log holding its share: each
  window's ceiling divided by the processes it last saw alive (never fewer than
  `min_processes`, never 1 after others were seen), started from what the shared log last
  said was used (its share of it, placed as late as those calls can have been). Its calls
  and any 429 it saw are written to Redis when it answers again (idempotently: each call
  is logged under its ticket), so the windows that follow count them and everyone pauses.
  This keeps the deployment under a limit when every process lost Redis at once and had
  read the log lately (the gateway reads it every `SYNC_S`); calls made by others in the
  seconds between a process's last read and the outage, or by processes that still reach
  Redis while this one cannot, can take a window over by at most that process's share.
  A spend Redis never answered (frozen, not gone) may still run when it wakes: its ticket
  is taken out again when the fallback's calls are charged.
- **When Redis comes back empty** (restarted with nothing on disk, as the compose file
  runs it, or failed over to a replica that had not caught up), the log of the last hour
  is gone. `{p:budget}:epoch` tells: the script sets a new one when there is none, and a
  process that saw another answers "lost" instead of spending. Each process keeps its own
  calls of the longest window (`_mine`) and charges them again; it then spends its share
  for `GRACE_S`, as when Redis is away, while every other process notices (each reads the
  log within `SYNC_S`) and charges its own.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from itertools import count

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.coordination.budget_scripts import BUDGET, CHARGE, PAUSE, REFUND, STAMP
from app.coordination.client import RETRY_AFTER_FAILURE_S, bounded
from app.gateway.budget import (
    LANES,
    SEEDED,
    Ask,
    Grant,
    LocalBudget,
    Window,
    WindowState,
    ceil_ms,
    floor_ms,
)
from app.gateway.windows import CallLog

log = logging.getLogger("app.coordination")

SYNC_S = 2.0
"""How often a gateway reads the shared log while idle (monitoring, and the fallback's start)."""
GRACE_S = 2 * SYNC_S
"""After the shared log was lost, how long a process spends its share before it trusts the
log again: every other process reads it (and charges its own calls) within SYNC_S."""


class RedisBudget:
    """A `Budget` shared by every process through Redis (see the module docstring)."""

    def __init__(
        self,
        redis: Redis,
        windows: Sequence[Window],
        *,
        prefix: str,
        timeout_s: float,
        processes: Callable[[], int],
        min_processes: int = 1,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.redis = redis
        self._limits = list(windows)
        self._clock = clock
        self.timeout_s = timeout_s
        self._processes = processes
        self._min_processes = max(1, min_processes)
        self._seen_processes = self._min_processes
        self._script = redis.register_script(BUDGET)
        self._refund = redis.register_script(REFUND)
        self._stamp = redis.register_script(STAMP)
        self._charge = redis.register_script(CHARGE)
        self._pause = redis.register_script(PAUSE)
        tag = f"{{{prefix}:budget}}"
        self._keys = [f"{tag}:paused", f"{tag}:log", *(f"{tag}:lane:{lane}" for lane in LANES)]
        self._epoch_key = f"{tag}:epoch"
        self._epoch = 0
        """The shared log's epoch last seen (0: none yet): a new one means the log was lost."""
        self._mine = CallLog(self._limits)
        """This process's own calls of the longest window, on Redis' clock: charged again
        when the shared log was lost."""
        self._unanswered: deque[str] = deque(maxlen=1000)
        """Tickets of spends Redis never answered: it may run them when it wakes (frozen)."""
        self._window_args: list[int] = []
        for window in self._limits:
            self._window_args += [window.span_ms, window.limit]
        self._token = secrets.token_hex(6)
        self._seq = count(1)
        self._local: LocalBudget | None = None
        self._down_until = 0.0
        self._offset_ms = 0
        """Redis' clock less ours (ms), as of the last answer: maps local calls onto it."""
        n = len(self._limits)
        self._used = [0] * n
        self._miss_waits_ms = [0] * n
        self._paused_ms = 0
        self._lanes = dict.fromkeys(LANES, 0)
        self._read_at = self._now()

    @property
    def limits(self) -> Sequence[Window]:
        return self._limits

    # ---- spending ---------------------------------------------------------------------

    async def try_spend(self, asks: Sequence[Ask]) -> Grant:
        ticket = f"{self._token}:{next(self._seq)}"
        reply = await self._ask(asks, ticket, spend=True)
        if reply is None:
            grant = self._fallback().spend_now(asks)
            if grant.lane is not None and grant.ticket is not None:
                self._mine.add(self._redis_ms(), grant.lane, grant.ticket)
            return grant
        granted, n, a = reply[0], len(self._limits), len(asks)
        waits = reply[3 + 2 * n : 3 + 2 * n + a]
        holders = reply[3 + 2 * n + a : 3 + 2 * n + 2 * a]
        names = [w.name for w in self._limits]
        held = tuple(None if h == 0 else "pause" if h < 0 else names[h - 1] for h in holders)
        if not granted:
            return Grant(None, None, tuple(w / 1000 for w in waits), held)
        self._mine.add(reply[1] + 1, asks[granted - 1].lane, ticket)  # at most 1 ms late
        return Grant(asks[granted - 1].lane, ticket, tuple(w / 1000 for w in waits), held)

    async def refund(self, ticket: str) -> None:
        self._mine.remove(ticket)
        if self._local is not None and self._local.log.remove(ticket) is not None:
            return  # granted by the fallback, still in its log
        if self._usable():  # in Redis (a fallback's call too, once charged there)
            try:
                await bounded(self._refund(keys=self._keys[1:], args=[ticket]), self.timeout_s)
            except RedisError as exc:  # the call stays logged: the budget only looks fuller
                self._down(exc)

    async def stamp(self, ticket: str, lane: str) -> None:
        if self._local is not None and ticket.startswith(self._local.token):
            await self._local.stamp(ticket, lane)  # a fallback's call: its log
            self._mine.restamp(ticket, lane, self._redis_ms())
            return
        if self._usable():
            try:
                args: list[int | str] = [ticket, self._now_arg()[1], LANES.index(lane) + 1]
                keys = self._keys[1:]
                at = await bounded(self._stamp(keys=keys, args=args), self.timeout_s)
                self._mine.restamp(ticket, lane, int(at))
            except RedisError as exc:  # logged at its grant: the margin has to cover it
                self._down(exc)

    async def pause(self, seconds: float) -> None:
        if self._usable():
            try:
                args = [ceil_ms(seconds), self._now_arg()[0]]
                await bounded(self._pause(keys=self._keys[:1], args=args), self.timeout_s)
            except RedisError as exc:
                self._down(exc)
        if self._local is not None:  # charged to Redis, so everyone pauses, once it is back
            await self._local.pause(seconds)
        self._paused_ms = ceil_ms(seconds)
        self._miss_waits_ms = [max(w, self._paused_ms) for w in self._miss_waits_ms]
        self._read_at = self._now()

    async def observe_remaining(self, remaining: int) -> None:
        # Freelancer counts every process's calls: nothing left means nobody may call.
        if remaining <= 0:
            await self.pause(1.0)

    # ---- what is left -----------------------------------------------------------------

    async def refresh(self) -> None:
        await self._ask([], "", spend=False)

    def windows(self) -> list[WindowState]:
        if self._local is not None:
            return self._local.windows()
        elapsed_ms = floor_ms(self._now() - self._read_at)
        return [
            WindowState(
                w.name,
                w.limit,
                w.period_s,
                w.margin_s,
                used,
                max(0, w.limit - used),
                max(0, wait - elapsed_ms) / 1000,
            )
            for w, used, wait in zip(self._limits, self._used, self._miss_waits_ms, strict=True)
        ]

    def lane_calls(self) -> dict[str, int]:
        if self._local is not None:
            local = self._local.lane_calls()
            return {lane: self._lanes[lane] + local[lane] for lane in LANES}
        return dict(self._lanes)

    def wait_s(self) -> float:
        if self._local is not None:
            return self._local.wait_s()
        return max((w.next_call_in_s for w in self.windows()), default=0.0)

    @property
    def throttled(self) -> bool:
        return self.wait_s() > 0

    # ---- plumbing ---------------------------------------------------------------------

    async def _ask(self, asks: Sequence[Ask], ticket: str, *, spend: bool) -> list[int] | None:
        """The script's reply (and the state it shows kept); None while Redis is away."""
        if not self._usable():
            return None
        args: list[int | str] = [*self._now_arg(), int(spend), ticket]
        args += [len(self._limits), *self._window_args, len(asks)]
        for ask in asks:
            args.append(LANES.index(ask.lane) + 1)
            reserve = ask.reserve or (0,) * len(self._limits)
            args += [w.limit - r for w, r in zip(self._limits, reserve, strict=True)]
        args += [self._epoch, secrets.randbits(52) + 1]
        keys = [*self._keys, self._epoch_key]
        try:
            if self._local is not None or self._unanswered:
                await self._charge_local()  # before the script: its answer counts them
            sent_ms = floor_ms(self._now())
            answer = await bounded(self._script(keys=keys, args=args), self.timeout_s)
        except RedisError as exc:
            if spend:  # Redis may run it yet (frozen, not gone): taken out when it is back
                self._unanswered.append(ticket)
            self._down(exc)
            return None
        reply = [int(v) for v in answer]
        self._offset_ms = reply[1] - sent_ms
        if reply[0] < 0:
            await self._log_lost(reply[2])
            return None
        n = len(self._limits)
        self._paused_ms = reply[2]
        self._used = reply[3 : 3 + n]
        self._miss_waits_ms = reply[3 + n : 3 + 2 * n]
        self._lanes = dict(zip(LANES, reply[-1 - len(LANES) : -1], strict=True))
        self._epoch = reply[-1]
        self._read_at = self._now()
        self._seen_processes = max(self._min_processes, self._processes())
        self._mine.read(reply[1])  # forget own calls older than the longest window
        if self._local is not None:
            self._local = None
            log.info("shared budget reachable again: the calls made meanwhile are charged to it")
        return reply

    async def _charge_local(self) -> None:
        """Charge Redis the calls the fallback made and any 429's pause; take out the
        spends it never answered. Kept until the budget script answers: charging twice
        changes nothing, and a failure falls back to the same log."""
        calls: list[tuple[int, str, str]] = []
        pause_until = 0
        if self._local is not None:
            local = self._local.log
            found = zip(local.times, local.lanes, local.tickets, strict=True)
            calls = [(at + self._offset_ms, lane, t) for at, lane, t in found if lane != SEEDED]
            pause_until = local.paused_until_ms + self._offset_ms
        await self._charge_calls(calls, pause_until)
        self._unanswered.clear()

    async def _charge_calls(self, calls: Sequence[tuple[int, str, str]], pause_until: int) -> None:
        args: list[int | str] = [max(w.span_ms for w in self._limits), pause_until]
        args += [self._now_arg()[0], len(self._unanswered), *self._unanswered]
        for at_ms, lane, ticket in calls:
            args += [at_ms, LANES.index(lane) + 1, ticket]
        await bounded(self._charge(keys=self._keys, args=args), self.timeout_s)

    async def _log_lost(self, epoch: int) -> None:
        """The shared log is new (Redis restarted with nothing on disk, or failed over):
        charge it this process's calls of the longest window and the pause it knew, then
        spend its share for a while, as when Redis is away, while the others do the same."""
        mine = zip(self._mine.times, self._mine.lanes, self._mine.tickets, strict=True)
        pause_until = floor_ms(self._read_at) + self._paused_ms + self._offset_ms
        try:
            await self._charge_calls(list(mine), pause_until)
        except RedisError as exc:
            self._down(exc)
            return
        self._epoch = epoch
        log.warning(
            "the shared budget's log was lost (Redis restarted empty?): this process's"
            " calls are charged to it again; it spends its share for %.1f s",
            GRACE_S,
        )
        self._down(None, for_s=GRACE_S + self.timeout_s)

    def _fallback(self) -> LocalBudget:
        """This process's share of each window while Redis is away (see the docstring)."""
        if self._local is None:
            share = self._seen_processes
            local = LocalBudget(self._limits, clock=self._now, share=share, token=self._token)
            local.seed([math.ceil(u / share) for u in self._used], self._read_at)
            local.log.paused_until_ms = floor_ms(self._read_at) + self._paused_ms
            self._local = local
        return self._local

    def _usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def _now(self) -> float:
        return time.monotonic() if self._clock is None else self._clock()

    def _now_arg(self) -> list[int]:
        """Now rounded down and up in ms; [-1, -1]: Redis' own clock."""
        if self._clock is None:
            return [-1, -1]
        now = self._clock()
        return [floor_ms(now), ceil_ms(now)]

    def _redis_ms(self) -> int:
        """Now on Redis' clock (as of the last answer), rounded up."""
        return ceil_ms(self._now()) + self._offset_ms

    def _down(self, exc: BaseException | None, *, for_s: float | None = None) -> None:
        if exc is not None and self._local is None:  # once an outage, not once a call
            log.warning("shared budget unavailable (%s): this process spends its share", exc)
        retry_s = RETRY_AFTER_FAILURE_S if for_s is None else for_s
        self._down_until = time.monotonic() + retry_s
        self._fallback()
