"""The upstream budget: Freelancer's windows as exact sliding logs of call times, by lane.

A `Window(name, limit, period_s, margin_s)` allows a call at time t iff fewer than `limit`
calls happened in (t - period - margin, t]: that is how Freelancer counts (never more than
`limit` calls in any span of `period_s`), widened by a margin, and no call is held back
while there is room. The log holds every call of the longest span, oldest first, each with
its lane (misses, jobs, refreshes) and a ticket (a call granted for a batch that ends up
empty is refunded).

**The margin.** A call is logged when it is granted, before its batch is gathered and
claimed; `stamp` moves it to the moment it is sent. It still reaches Freelancer later (the
stamp's reply, event-loop lag, a TLS handshake, the trip), so two calls `limit` apart in
the log could land less than `period` apart there. With every call stamped at its send
and reaching Freelancer at most `margin` after it, two calls `limit` apart in the log are
at least `period + margin` apart there minus that delay: never less than `period`.
`UPSTREAM_WINDOW_MARGIN_S` (1 s) covers a handshake and a trip across the world, and costs
the minute's sustained rate 1.6 % (50 in 61 s); bursts are not affected.

Time is whole milliseconds, rounded to the safe side: a call is logged at its time rounded
up, and "now" is rounded down when the log is read, so a window can only look fuller than
it is, by under 1 ms. Everything else is integer arithmetic (no float is ever read as
"allowed"); `app.coordination.redis_budget` runs the same arithmetic in Redis.

A caller asks with an `Ask`: its lane, and per window how many calls it must leave to
others (its reserve; 0 for interactive misses). `try_spend` takes the first ask, in the
caller's order, that every window has room for, or says how long each must wait. Which
lane asks first, and how the background lanes pace themselves, is `app.gateway.planner`'s
policy; this module only counts, exactly.

`LocalBudget` keeps the log in this process (`bisect` over a list: hand-written because
the `limits` package's moving window answers "may I" for one window and one caller,
while a lane needs both windows checked together against its own reserve, the lanes'
counts, and a refund).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import count
from typing import Protocol

from app.config import Settings

MISSES = "misses"
JOBS = "jobs"
REFRESHES = "refreshes"
LANES = (MISSES, JOBS, REFRESHES)
"""Interactive misses, crawl jobs, background refreshes (the sweep included)."""
SEEDED = "seeded"
"""Calls a fallback log starts with: what the shared log last said was used (no lane)."""


@dataclass(frozen=True, slots=True)
class Window:
    """At most `limit` calls in any `period_s`, counted over `period_s + margin_s` (whole
    milliseconds: see the module docstring)."""

    name: str
    limit: int
    period_s: float
    margin_s: float = 0.0

    @property
    def span_ms(self) -> int:
        """The span the log counts calls in: the period and the margin."""
        return round((self.period_s + self.margin_s) * 1000)


@dataclass(frozen=True, slots=True)
class WindowState:
    """One window as monitoring shows it, from the log: the whole deployment's calls."""

    name: str
    limit: int
    period_s: float
    margin_s: float
    used: int
    """Calls in the last `period_s + margin_s` (the calls that still count)."""
    remaining: int
    """`limit - used` (never below 0)."""
    next_call_in_s: float
    """Seconds until an interactive miss may call (0.0: now)."""


@dataclass(frozen=True, slots=True)
class Ask:
    """A lane asking for one call; it leaves `reserve[i]` calls of window i to others."""

    lane: str
    reserve: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Grant:
    """What `try_spend` answered: the lane that spent a call (None: none could), its
    ticket, and per ask the seconds until it could spend and what holds it."""

    lane: str | None
    ticket: str | None
    waits_s: tuple[float, ...]
    held_by: tuple[str | None, ...]
    """Per ask: the window that holds it, "pause" (a 429), or None (it may go)."""


def budget_windows(settings: Settings) -> list[Window]:
    """Freelancer's limits as windows (the shortest first); 50.5 a minute means 50."""
    margin = settings.upstream_window_margin_s
    return [
        Window("minute", math.floor(settings.upstream_rate_per_min), 60.0, margin),
        Window("hour", math.floor(settings.upstream_rate_per_hour), 3600.0, margin),
    ]


def floor_ms(seconds: float) -> int:
    """`seconds` as whole milliseconds, rounded down (when reading the log)."""
    return math.floor(seconds * 1000)


def ceil_ms(seconds: float) -> int:
    """`seconds` as whole milliseconds, rounded up (when logging a call, or a wait)."""
    return math.ceil(seconds * 1000)


class Budget(Protocol):
    """Exact windows of calls, spent by lane; what is used and left in each."""

    @property
    def limits(self) -> Sequence[Window]:
        """The windows, shortest first."""

    async def try_spend(self, asks: Sequence[Ask]) -> Grant:
        """Spend one call for the first ask every window has room for, if any; never waits."""

    async def refund(self, ticket: str) -> None:
        """A granted call was not made: take it out of the log."""

    async def stamp(self, ticket: str) -> None:
        """The granted call is being sent now: log it at this instant (never earlier)."""

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


async def acquire(budget: Budget, ask: Ask, *, poll_s: float = 1.0) -> str:
    """Wait until `ask` may spend a call, spend it, and return its ticket."""
    while True:
        grant = await budget.try_spend([ask])
        if grant.ticket is not None:
            return grant.ticket
        await asyncio.sleep(min(max(grant.waits_s[0], 0.001), poll_s))


@dataclass(slots=True)
class Reading:
    """The log read at one instant: per window calls used; the pause left (ms)."""

    now_ms: int
    used: list[int]
    paused_ms: int


class CallLog:
    """The sliding log: call times (whole ms, rounded up), oldest first, with lane and ticket.

    The same arithmetic as the Redis script (`app.coordination.redis_budget.BUDGET`), on lists.
    """

    def __init__(self, windows: Sequence[Window]) -> None:
        if not windows:
            raise ValueError("a budget needs at least one window")
        self.limits = list(windows)
        self.keep_ms = max(w.span_ms for w in windows)
        self.times: list[int] = []
        self.lanes: list[str] = []
        self.tickets: list[str] = []
        self.paused_until_ms = 0

    def read(self, now_ms: int) -> Reading:
        """Drop calls outside every window; count each window's calls at `now_ms`."""
        gone = bisect_right(self.times, now_ms - self.keep_ms)
        if gone:
            del self.times[:gone], self.lanes[:gone], self.tickets[:gone]
        total = len(self.times)
        used = [total - bisect_right(self.times, now_ms - w.span_ms) for w in self.limits]
        return Reading(now_ms, used, max(0, self.paused_until_ms - now_ms))

    def window_wait_ms(self, reading: Reading, i: int, ceiling: int) -> int:
        """Ms until window i holds fewer than `ceiling` calls (0: it does now)."""
        used, window = reading.used[i], self.limits[i]
        if used < ceiling:
            return 0
        if ceiling <= 0:  # no call at all for this lane in this window (for now)
            return window.span_ms
        # It has room once its (used - ceiling + 1)-th oldest call leaves: the call at
        # index total - ceiling, which leaves `span` after it was made.
        oldest = self.times[len(self.times) - ceiling]
        return max(1, oldest + window.span_ms - reading.now_ms)

    def wait_ms(self, reading: Reading, ceilings: Sequence[int]) -> tuple[int, str | None]:
        """Ms until every window i holds fewer than `ceilings[i]` calls, and what holds it."""
        wait, held = reading.paused_ms, "pause" if reading.paused_ms else None
        for i, ceiling in enumerate(ceilings):
            window_wait = self.window_wait_ms(reading, i, ceiling)
            if window_wait > wait:
                wait, held = window_wait, self.limits[i].name
        return wait, held

    def add(self, at_ms: int, lane: str, ticket: str) -> None:
        """Log a call (kept in time order: a charged call may be older than the last)."""
        index = bisect_right(self.times, at_ms)
        self.times.insert(index, at_ms)
        self.lanes.insert(index, lane)
        self.tickets.insert(index, ticket)

    def remove(self, ticket: str) -> str | None:
        """Take a refunded call out (it is usually among the newest: search from the end);
        its lane, or None when it is not (or no longer) in the log."""
        for index in range(len(self.tickets) - 1, -1, -1):
            if self.tickets[index] == ticket:
                lane = self.lanes[index]
                del self.times[index], self.lanes[index], self.tickets[index]
                return lane
        return None

    def restamp(self, ticket: str, at_ms: int) -> None:
        """Move a call to `at_ms` when that is later than where it is (it was sent then)."""
        for index in range(len(self.tickets) - 1, -1, -1):
            if self.tickets[index] == ticket:
                if self.times[index] < at_ms:
                    lane = self.lanes[index]
                    del self.times[index], self.lanes[index], self.tickets[index]
                    self.add(at_ms, lane, ticket)
                return

    def lane_calls(self) -> dict[str, int]:
        """Calls per lane in the log (after a `read`, the longest window's)."""
        counts = dict.fromkeys(LANES, 0)
        for lane in self.lanes:
            if lane in counts:
                counts[lane] += 1
        return counts

    def ceilings(self, ask: Ask, share: int = 1) -> list[int]:
        """What `ask` may fill each window up to: its limit less its reserve (over `share`
        processes, each gets the floor of its part)."""
        reserve = ask.reserve or (0,) * len(self.limits)
        return [(w.limit - r) // share for w, r in zip(self.limits, reserve, strict=True)]

    def spend(
        self, asks: Sequence[Ask], now_ms: int, at_ms: int, ticket: str, share: int = 1
    ) -> tuple[Grant, Reading]:
        """Log a call for the first ask that fits, else say how long each must wait."""
        reading = self.read(now_ms)
        waits: list[float] = []
        holds: list[str | None] = []
        for ask in asks:
            wait, held = self.wait_ms(reading, self.ceilings(ask, share))
            if wait == 0:
                self.add(at_ms, ask.lane, ticket)
                for i in range(len(reading.used)):
                    reading.used[i] += 1
                waits.append(0.0)
                holds.append(None)
                pad = len(asks) - len(waits)
                grant = Grant(ask.lane, ticket, (*waits, *(0.0,) * pad), (*holds, *(None,) * pad))
                return grant, reading
            waits.append(wait / 1000)
            holds.append(held)
        return Grant(None, None, tuple(waits), tuple(holds)), reading

    def states(self, reading: Reading, share: int = 1) -> list[WindowState]:
        """Each window as monitoring shows it, at the reading's instant."""
        states = []
        for i, (window, used) in enumerate(zip(self.limits, reading.used, strict=True)):
            limit = window.limit // share
            wait = max(reading.paused_ms, self.window_wait_ms(reading, i, limit))
            states.append(
                WindowState(
                    window.name,
                    limit,
                    window.period_s,
                    window.margin_s,
                    used,
                    max(0, limit - used),
                    wait / 1000,
                )
            )
        return states


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

    async def stamp(self, ticket: str) -> None:
        self.log.restamp(ticket, ceil_ms(self._clock()))

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
