"""The upstream budget: how many calls Freelancer allows per window, shared by every caller.

`Budget` is the seam: the gateway asks it before every call and tells it what Freelancer
said (a 429's Retry-After, `RateLimit-Remaining`). `LocalBudget` keeps one token bucket
per `Window` in this process; a deployment of several processes needs one kept for all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from app.config import Settings


@dataclass(frozen=True, slots=True)
class Window:
    """At most `limit` calls in any `period_s`, of which `burst` may go back to back.

    A bucket holding `burst` calls and refilled at `limit / period_s` would allow
    `burst + limit` in a period; refilled at `rate_per_s`, it never allows more than `limit`.
    """

    name: str
    limit: float
    period_s: float
    burst: int

    @property
    def rate_per_s(self) -> float:
        """The sustained rate: what is left of the limit once a burst is spent, per second
        (a window too small to hold its burst falls back to `limit / period_s`)."""
        left = self.limit - self.burst
        return (left if left > 0 else self.limit) / self.period_s


@dataclass(frozen=True, slots=True)
class WindowState:
    """One window as monitoring shows it: its limit, and the calls it would allow now."""

    name: str
    limit: float
    period_s: float
    remaining: int


def budget_windows(settings: Settings) -> list[Window]:
    """Freelancer's limits as budget windows, from the settings (the shortest first)."""
    minute, hour = settings.upstream_rate_per_min, settings.upstream_rate_per_hour
    return [
        Window("minute", minute, 60.0, min(settings.upstream_burst, int(minute) - 1)),
        Window("hour", hour, 3600.0, min(settings.upstream_burst, int(hour) - 1)),
    ]


class Budget(Protocol):
    """May a call go out now, how long until one may, and what is left in each window."""

    async def acquire(self) -> None:
        """Wait until a call may go out, then spend one call of every window."""

    async def pause(self, seconds: float) -> None:
        """Freelancer answered 429: no caller sends anything for `seconds`."""

    async def observe_remaining(self, remaining: int) -> None:
        """Freelancer said how many calls are left in its shortest window."""

    def wait_s(self) -> float:
        """Seconds until a call may go out (0.0: now), without spending anything."""

    @property
    def throttled(self) -> bool:
        """True while the next call would have to wait."""

    def windows(self) -> list[WindowState]:
        """Each window's limit and what is left of it (as of the last `refresh`)."""

    async def refresh(self) -> None:
        """Bring `windows` and `throttled` up to date without spending anything."""


class TokenBucket:
    """`rate_per_s` tokens a second up to `burst`; callers reserve a token and sleep if needed.

    Reservations may drive the balance negative: each caller then waits its turn, in
    order, instead of all waking at once. `pause_for` (a 429's Retry-After) and
    `observe_remaining` (Freelancer's `RateLimit-Remaining`) slow it down further.
    """

    def __init__(
        self, rate_per_s: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()
        self._paused_until = 0.0

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    def reserve(self) -> float:
        """Take one token; return how many seconds the caller must wait before using it."""
        now = self._clock()
        self._refill(now)
        self._tokens -= 1.0
        wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        return max(wait, self._paused_until - now)

    async def acquire(self) -> None:
        """Wait until a call may go out."""
        wait = self.reserve()
        if wait > 0:
            await asyncio.sleep(wait)

    def pause_for(self, seconds: float) -> None:
        """Send nothing for `seconds` (Freelancer said Retry-After)."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    def observe_remaining(self, remaining: int) -> None:
        """Never hold more tokens than Freelancer says are left in its window."""
        now = self._clock()
        self._refill(now)
        self._tokens = min(self._tokens, float(remaining))

    def wait_s(self) -> float:
        """Seconds until a token is free, without taking one."""
        now = self._clock()
        self._refill(now)
        short = (1.0 - self._tokens) / self.rate if self._tokens < 1.0 else 0.0
        return max(short, self._paused_until - now, 0.0)

    @property
    def tokens(self) -> float:
        """Tokens held now (negative while callers are waiting their turn)."""
        self._refill(self._clock())
        return self._tokens

    @property
    def throttled(self) -> bool:
        """True while the next call would have to wait."""
        now = self._clock()
        self._refill(now)
        return self._tokens < 1.0 or self._paused_until > now


class LocalBudget:
    """A `Budget` kept in this process: one token bucket per window, all spent per call.

    Freelancer's `RateLimit-Remaining` is applied to the first (shortest) window only:
    the header gives one number, and clamping an hourly bucket to a per-minute count
    would starve it for the rest of the hour.
    """

    def __init__(
        self, windows: Sequence[Window], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not windows:
            raise ValueError("a budget needs at least one window")
        self._windows = list(windows)
        self._buckets = [TokenBucket(w.rate_per_s, w.burst, clock=clock) for w in self._windows]

    async def acquire(self) -> None:
        wait = max([bucket.reserve() for bucket in self._buckets])
        if wait > 0:
            await asyncio.sleep(wait)

    async def pause(self, seconds: float) -> None:
        for bucket in self._buckets:
            bucket.pause_for(seconds)

    async def observe_remaining(self, remaining: int) -> None:
        self._buckets[0].observe_remaining(remaining)

    def wait_s(self) -> float:
        return max(bucket.wait_s() for bucket in self._buckets)

    @property
    def throttled(self) -> bool:
        return any(bucket.throttled for bucket in self._buckets)

    async def refresh(self) -> None:
        return None

    def windows(self) -> list[WindowState]:
        return [
            WindowState(w.name, w.limit, w.period_s, max(0, int(b.tokens)))
            for w, b in zip(self._windows, self._buckets, strict=True)
        ]
