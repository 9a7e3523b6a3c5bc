"""`RedisBudget`: the budget's sliding log shared by every process, in one Lua script.

Keys (one hash tag, so one Redis Cluster slot): `{p:budget}:log`, every call of the
longest window as a sorted set (score: the call's time in whole ms, rounded up; member:
its ticket), `{p:budget}:lane:<lane>` the same calls by lane (for the lanes' shares), and
`{p:budget}:paused`, the ms until which a 429 stops everyone.

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
"""

from __future__ import annotations

import logging
import math
import secrets
import time
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

log = logging.getLogger("app.coordination")

SYNC_S = 2.0
"""How often a gateway reads the shared log while idle (monitoring, and the fallback's start)."""


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
            return self._fallback().spend_now(asks)
        granted, n, a = reply[0], len(self._limits), len(asks)
        waits = reply[3 + 2 * n : 3 + 2 * n + a]
        holders = reply[3 + 2 * n + a : 3 + 2 * n + 2 * a]
        names = [w.name for w in self._limits]
        held = tuple(None if h == 0 else "pause" if h < 0 else names[h - 1] for h in holders)
        if not granted:
            return Grant(None, None, tuple(w / 1000 for w in waits), held)
        return Grant(asks[granted - 1].lane, ticket, tuple(w / 1000 for w in waits), held)

    async def refund(self, ticket: str) -> None:
        if self._local is not None and self._local.log.remove(ticket) is not None:
            return  # granted by the fallback, still in its log
        if self._usable():  # in Redis (a fallback's call too, once charged there)
            try:
                await bounded(self._refund(keys=self._keys[1:], args=[ticket]), self.timeout_s)
            except RedisError as exc:  # the call stays logged: the budget only looks fuller
                self._down(exc)

    async def stamp(self, ticket: str) -> None:
        if self._local is not None and ticket.startswith(self._local.token):
            await self._local.stamp(ticket)  # a fallback's call: its log
            return
        if self._usable():
            try:
                args: list[int | str] = [ticket, self._now_arg()[1]]
                await bounded(self._stamp(keys=self._keys[1:], args=args), self.timeout_s)
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
        try:
            if self._local is not None:
                await self._recover()
            sent_ms = floor_ms(self._now())
            answer = await bounded(self._script(keys=self._keys, args=args), self.timeout_s)
        except RedisError as exc:
            self._down(exc)
            return None
        reply = [int(v) for v in answer]
        n = len(self._limits)
        self._offset_ms = reply[1] - sent_ms
        self._paused_ms = reply[2]
        self._used = reply[3 : 3 + n]
        self._miss_waits_ms = reply[3 + n : 3 + 2 * n]
        self._lanes = dict(zip(LANES, reply[len(reply) - len(LANES) :], strict=True))
        self._read_at = self._now()
        self._seen_processes = max(self._min_processes, self._processes())
        return reply

    async def _recover(self) -> None:
        """Redis answers again: charge it the calls made meanwhile, and any 429's pause."""
        local = self._local
        assert local is not None
        args: list[int | str] = [max(w.span_ms for w in self._limits)]
        paused_until = local.log.paused_until_ms
        now_ms = floor_ms(self._now())
        args.append(paused_until + self._offset_ms if paused_until > now_ms else 0)
        calls = zip(local.log.times, local.log.lanes, local.log.tickets, strict=True)
        for at_ms, lane, ticket in calls:
            if lane != SEEDED:
                args += [at_ms + self._offset_ms, LANES.index(lane) + 1, ticket]
        await bounded(self._charge(keys=self._keys, args=args), self.timeout_s)
        self._local = None
        log.info("shared budget reachable again: the calls made meanwhile are charged to it")

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

    def _down(self, exc: BaseException) -> None:
        log.warning("shared budget unavailable (%s): this process spends its share", exc)
        self._down_until = time.monotonic() + RETRY_AFTER_FAILURE_S
        self._fallback()
