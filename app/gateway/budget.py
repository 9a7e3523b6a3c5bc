"""The upstream budget seam: spend a call for the first lane that fits, give it back, log
it when it is sent, pause everyone on a 429, and say what is used and left per window.

The windows' exact arithmetic (sliding logs in whole milliseconds, the margin, reserves)
is `app.gateway.windows`. `LocalBudget` keeps one log in this process;
`app.coordination.redis_budget.RedisBudget` shares one through Redis. Which lane asks
first, and how the background lanes pace themselves, is `app.gateway.planner`'s policy.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Sequence
from itertools import count
from typing import Protocol

from app.config import Settings
from app.gateway.windows import (
    JOBS,
    LANES,
    MISSES,
    REFRESHES,
    SEEDED,
    Ask,
    CallLog,
    Grant,
    Window,
    WindowState,
    ceil_ms,
    floor_ms,
)

__all__ = [
    "JOBS",
    "LANES",
    "MISSES",
    "REFRESHES",
    "SEEDED",
    "Ask",
    "Budget",
    "Grant",
    "LocalBudget",
    "Window",
    "WindowState",
    "budget_windows",
    "ceil_ms",
    "floor_ms",
]


def budget_windows(settings: Settings) -> list[Window]:
    """Freelancer's limits as windows (the shortest first); 50.5 a minute means 50."""
    margin = settings.upstream_window_margin_s
    return [
        Window("minute", math.floor(settings.upstream_rate_per_min), 60.0, margin),
        Window("hour", math.floor(settings.upstream_rate_per_hour), 3600.0, margin),
    ]


class Budget(Protocol):
    """Exact windows of calls, spent by lane; what is used and left in each."""

    @property
    def limits(self) -> Sequence[Window]:
        """The windows, shortest first."""

    async def try_spend(self, asks: Sequence[Ask]) -> Grant:
        """Spend one call for the first ask every window has room for, if any; never waits."""

    async def refund(self, ticket: str) -> None:
        """A granted call was not made: take it out of the log."""

    async def stamp(self, ticket: str, lane: str) -> None:
        """The call granted to `lane` is being sent now: log it at this instant (never
        earlier; again, if it was granted so long ago that it left the log)."""

    async def pause(self, seconds: float) -> None:
        """Freelancer answered 429: no caller sends anything for `seconds`."""

    async def observe_remaining(self, remaining: int) -> None:
        """Freelancer said how many calls are left in its shortest window."""

    def wait_s(self) -> float:
        """Seconds until an interactive miss may call (0.0: now), as last seen."""

    @property
    def throttled(self) -> bool:
        """True while an interactive miss would have to wait."""

    def windows(self) -> list[WindowState]:
        """Each window's limit, calls used and left, and when a miss may call next."""

    def lane_calls(self) -> dict[str, int]:
        """Calls per lane in the longest window (the whole deployment, as last seen)."""

    async def refresh(self) -> None:
        """Bring `windows`, `lane_calls` and `wait_s` up to date without spending."""


class LocalBudget:
    """A `Budget` kept in this process: one `CallLog`, read and spent with no await."""

    def __init__(
        self,
        windows: Sequence[Window],
        *,
        clock: Callable[[], float] = time.monotonic,
        share: int = 1,
        token: str | None = None,
    ) -> None:
        self.log = CallLog(windows)
        self._clock = clock
        self.share = share
        """Processes this budget is one part of (a fallback's share): each ceiling is divided."""
        self.token = f"{token}-local:" if token else f"{secrets.token_hex(4)}:"
        """What this budget's tickets start with."""
        self._seq = count(1)

    @property
    def limits(self) -> Sequence[Window]:
        return self.log.limits

    def seed(self, used: Sequence[int], at_s: float) -> None:
        """Start from calls another log said were used at `at_s`, each placed as late as
        it can have been: a window's calls beyond the shorter window's just before it."""
        at_ms = ceil_ms(at_s)
        placed = 0
        shorter_ms = 0
        for window, calls in zip(self.log.limits, used, strict=True):
            for _ in range(max(0, calls - placed)):
                self.log.add(at_ms - shorter_ms, SEEDED, f"seed:{next(self._seq)}")
            placed = max(placed, calls)
            shorter_ms = window.span_ms

    def new_ticket(self) -> str:
        return f"{self.token}{next(self._seq)}"

    async def try_spend(self, asks: Sequence[Ask]) -> Grant:
        return self.spend_now(asks)

    def spend_now(self, asks: Sequence[Ask]) -> Grant:
        """`try_spend`, synchronously."""
        now = self._clock()
        grant, _ = self.log.spend(asks, floor_ms(now), ceil_ms(now), self.new_ticket(), self.share)
        return grant

    async def refund(self, ticket: str) -> None:
        self.log.remove(ticket)

    async def stamp(self, ticket: str, lane: str) -> None:
        self.log.restamp(ticket, lane, ceil_ms(self._clock()))

    async def pause(self, seconds: float) -> None:
        until = floor_ms(self._clock()) + ceil_ms(seconds)
        self.log.paused_until_ms = max(self.log.paused_until_ms, until)

    async def observe_remaining(self, remaining: int) -> None:
        # Freelancer counts every caller's calls: nothing left means nobody may call.
        if remaining <= 0:
            await self.pause(1.0)

    def wait_s(self) -> float:
        reading = self.log.read(floor_ms(self._clock()))
        wait, _ = self.log.wait_ms(reading, self.log.ceilings(Ask(MISSES), self.share))
        return wait / 1000

    @property
    def throttled(self) -> bool:
        return self.wait_s() > 0

    def windows(self) -> list[WindowState]:
        return self.log.states(self.log.read(floor_ms(self._clock())), self.share)

    def lane_calls(self) -> dict[str, int]:
        self.log.read(floor_ms(self._clock()))
        return self.log.lane_calls()

    async def refresh(self) -> None:
        return None
