"""`RedisBudget`: Freelancer's windows shared by every process, as GCRA states in Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.coordination.client import RETRY_AFTER_FAILURE_S, bounded
from app.gateway.budget import LocalBudget, Window, WindowState

log = logging.getLogger("app.coordination")

# KEYS: pause, then one GCRA state per window. ARGV: now in ms (-1: the server's time, so
# the processes' clocks never matter; tests pass their own), spend (1 to take a call, 0
# to only ask), then per window its emission interval and burst tolerance in ms. Returns
# {ms to wait (0: allowed, and taken when spending), ms the next call would wait, then
# each window's calls left now}.
BUDGET = """
local now = tonumber(ARGV[1])
if now < 0 then local t = redis.call('TIME') now = t[1] * 1000 + math.floor(t[2] / 1000) end
local spend = tonumber(ARGV[2])
local wait = math.max(0, tonumber(redis.call('GET', KEYS[1]) or '0') - now)
local tats = {}
for i = 2, #KEYS do
  local interval, tolerance = tonumber(ARGV[i * 2 - 1]), tonumber(ARGV[i * 2])
  tats[i] = math.max(tonumber(redis.call('GET', KEYS[i]) or '0'), now)
  wait = math.max(wait, tats[i] - now - tolerance)
end
local reply = {wait, 0}
local paused = math.max(0, tonumber(redis.call('GET', KEYS[1]) or '0') - now)
local next_wait = paused
for i = 2, #KEYS do
  local interval, tolerance = tonumber(ARGV[i * 2 - 1]), tonumber(ARGV[i * 2])
  if wait == 0 and spend == 1 then
    tats[i] = tats[i] + interval
    redis.call('SET', KEYS[i], tats[i], 'PX', math.ceil(tolerance + interval * 2))
  end
  next_wait = math.max(next_wait, tats[i] - now - tolerance)
  reply[i + 1] = math.max(0, math.floor((now + tolerance + interval - tats[i]) / interval))
end
reply[2] = next_wait
return reply
"""
# KEYS: pause. ARGV: ms, now in ms (-1: the server's). Nobody calls before now + ms; a
# later pause wins.
PAUSE = """
local now = tonumber(ARGV[2])
if now < 0 then local t = redis.call('TIME') now = t[1] * 1000 + math.floor(t[2] / 1000) end
local until_ms = now + tonumber(ARGV[1])
if until_ms > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], until_ms, 'PX', tonumber(ARGV[1]) + 1000)
end
return until_ms
"""


class RedisBudget:
    """A `Budget` shared by every process: one GCRA state per window, in one Lua script.

    While Redis cannot be reached it falls back to a local budget holding this process's
    share of each window (the limit divided by the processes last seen alive), so the
    deployment as a whole stays under Freelancer's limits.
    """

    def __init__(
        self,
        redis: Redis,
        windows: Sequence[Window],
        *,
        prefix: str,
        timeout_s: float,
        processes: Callable[[], int],
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.redis = redis
        self._clock = clock
        self._windows = list(windows)
        self.timeout_s = timeout_s
        self._processes = processes
        self._script = redis.register_script(BUDGET)
        self._pause = redis.register_script(PAUSE)
        tag = f"{{{prefix}:budget}}"
        self._keys = [f"{tag}:paused", *(f"{tag}:{w.name}" for w in self._windows)]
        self._args: list[float] = []
        for window in self._windows:
            interval_ms = 1000 / window.rate_per_s
            self._args += [interval_ms, interval_ms * max(0, window.burst - 1)]
        self._local: LocalBudget | None = None
        self._local_share = 0
        self._down_until = 0.0
        self._last: list[int] = [0, 0, *(w.burst for w in self._windows)]
        self._last_at = self._elapsed_clock()

    async def acquire(self) -> None:
        while True:
            wait = await self._ask(spend=True)
            if wait is None:
                await self._fallback().acquire()
                return
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def pause(self, seconds: float) -> None:
        await self._fallback().pause(seconds)
        self._last[1], self._last_at = (
            max(self._last[1], int(seconds * 1000)),
            self._elapsed_clock(),
        )
        if time.monotonic() >= self._down_until:
            try:
                await bounded(
                    self._pause(keys=self._keys[:1], args=[int(seconds * 1000)]), self.timeout_s
                )
            except RedisError as exc:
                self._down(exc)

    async def observe_remaining(self, remaining: int) -> None:
        # Freelancer counts every process's calls: nothing left means nobody may call.
        if remaining <= 0:
            await self.pause(1.0)

    def wait_s(self) -> float:
        """From the last answer: the wait it said the next call has, less the time since."""
        return max(0.0, self._last[1] / 1000 - (self._elapsed_clock() - self._last_at))

    async def refresh(self) -> None:
        """Ask Redis what is left, without spending (monitoring calls this)."""
        await self._ask(spend=False)

    @property
    def throttled(self) -> bool:
        return self.wait_s() > 0

    def windows(self) -> list[WindowState]:
        return [
            WindowState(w.name, w.limit, w.period_s, int(left))
            for w, left in zip(self._windows, self._last[2:], strict=True)
        ]

    async def _ask(self, *, spend: bool) -> float | None:
        """Seconds to wait (0: a call was taken); None while Redis cannot be asked."""
        if time.monotonic() < self._down_until:
            return None
        try:
            reply = await bounded(
                self._script(keys=self._keys, args=[self._now_ms(), int(spend), *self._args]),
                self.timeout_s,
            )
        except RedisError as exc:
            self._down(exc)
            return None
        self._last = [int(v) for v in reply]
        self._last_at = self._elapsed_clock()
        return self._last[0] / 1000

    def _elapsed_clock(self) -> float:
        return time.monotonic() if self._clock is None else self._clock()

    def _now_ms(self) -> int:
        return -1 if self._clock is None else int(self._clock() * 1000)

    def _down(self, exc: BaseException) -> None:
        log.warning("shared budget unavailable (%s): this process uses its share", exc)
        self._down_until = time.monotonic() + RETRY_AFTER_FAILURE_S

    def _fallback(self) -> LocalBudget:
        share = max(1, self._processes())
        if self._local is None or share != self._local_share:
            windows = [
                Window(w.name, w.limit / share, w.period_s, max(1, w.burst // share))
                for w in self._windows
            ]
            self._local, self._local_share = LocalBudget(windows), share
        return self._local
