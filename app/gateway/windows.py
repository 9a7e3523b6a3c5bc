"""Freelancer's windows as exact sliding logs of call times, by lane: the arithmetic.

A `Window(name, limit, period_s, margin_s)` allows a call at time t iff fewer than `limit`
calls happened in (t - period - margin, t]: that is how Freelancer counts (never more than
`limit` calls in any span of `period_s`), widened by a margin, and no call is held back
while there is room. A `CallLog` holds every call of the longest span, oldest first, each
with its lane (misses, jobs, refreshes) and a ticket (a call granted for a batch that ends
up empty is refunded; a call is moved to when it is sent).

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
"allowed"); `app.coordination.budget_scripts` runs the same arithmetic in Redis.

A caller asks with an `Ask`: its lane, and per window how many calls it must leave to
others (its reserve; 0 for interactive misses). `spend` takes the first ask, in the
caller's order, that every window has room for, or says how long each must wait.

Hand-written (`bisect` over lists) because the `limits` package's moving window answers
"may I" for one window and one caller, while a lane needs both windows checked together
against its own reserve, the lanes' counts, a refund and a send time.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

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


def floor_ms(seconds: float) -> int:
    """`seconds` as whole milliseconds, rounded down (when reading the log)."""
    return math.floor(seconds * 1000)


def ceil_ms(seconds: float) -> int:
    """`seconds` as whole milliseconds, rounded up (when logging a call, or a wait)."""
    return math.ceil(seconds * 1000)


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

    def restamp(self, ticket: str, lane: str, at_ms: int) -> None:
        """The call was sent at `at_ms`: move it there when that is later than where it is,
        or log it again if it was granted so long ago that it left the log."""
        for index in range(len(self.tickets) - 1, -1, -1):
            if self.tickets[index] == ticket:
                if self.times[index] >= at_ms:
                    return
                del self.times[index], self.lanes[index], self.tickets[index]
                break
        self.add(at_ms, lane, ticket)

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
