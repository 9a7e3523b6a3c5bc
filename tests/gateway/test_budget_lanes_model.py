"""The budget by lane against a small reference model, driven by Hypothesis: fractional
clocks, margins, reserves per lane and window, concurrent callers on one budget or two
processes sharing Redis, several asks in one call, sends (stamps) and refunds.

The model is a plain list of the granted calls' times (moved when a call is sent, removed
when it is refunded). What must hold, every step:
- **No lane over its ceiling**: a call granted to an ask that leaves `reserve` calls of a
  window to others finds fewer than `limit - reserve` calls in that window's span.
  Callers served at one instant may have been served in any order: the grants of an instant
  must fit in some order (the one by least slack, which fits whenever any does).
- **Nothing refused with room**: an ask refused (or passed over for a later ask of the same
  call) finds a window (read 1 ms wider: the log rounds to the safe side) holding its
  ceiling; a miss (no reserve) is therefore never refused while every window has room.
- **A refund frees the one call it took**: the model removes exactly that call, and every
  later grant and refusal is checked against it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.gateway.budget import JOBS, MISSES, REFRESHES, Ask, Budget, LocalBudget, Window
from tests.gateway.test_budget import redis_budget
from tests.support.clock import FakeClock
from tests.support.procs import RedisServer

LANE_NAMES = (MISSES, JOBS, REFRESHES)

WINDOWS = st.lists(
    st.tuples(st.integers(1, 6), st.integers(1, 20_000), st.integers(0, 2_000)),
    min_size=1,
    max_size=3,
)
"""(limit, period ms, margin ms) per window."""
CALL = st.tuples(
    st.integers(0, 1),  # which process
    st.permutations(LANE_NAMES).flatmap(lambda p: st.integers(1, 3).map(lambda n: p[:n])),
)
"""A try_spend: the process it asks, and its asks' lanes in order."""
STEP = st.tuples(
    st.floats(0, 8.0, allow_nan=False),  # seconds to advance
    st.lists(CALL, min_size=0, max_size=4),  # concurrent calls at this instant
    st.integers(0, 3),  # granted calls to send (stamp) now, oldest unsent first
    st.integers(0, 2),  # granted calls to refund now, newest first
)
RESERVES = st.tuples(st.floats(0, 1), st.floats(0, 1))
"""The jobs' and refreshes' reserve as a fraction of each window's limit (a miss has none)."""


@dataclass
class Call:
    ticket: str
    lane: str
    at: float
    process: int
    sent: bool = False


@dataclass
class Model:
    windows: Sequence[Window]
    reserves: dict[str, tuple[int, ...]]
    calls: list[Call] = field(default_factory=list)

    def ceiling(self, lane: str, i: int) -> int:
        return self.windows[i].limit - self.reserves[lane][i]

    def inside(self, at: float, i: int, wider_s: float = 0.0) -> int:
        span = self.windows[i].period_s + self.windows[i].margin_s
        return sum(1 for c in self.calls if at - span - wider_s < c.at <= at)

    def check_refused(self, at: float, lane: str, granted_now: int) -> None:
        """Some window was full for `lane` (counting every grant of this instant, which may
        have been served first), read 1 ms wider."""
        full = any(
            self.inside(at, i, 0.001) >= self.ceiling(lane, i) for i in range(len(self.windows))
        )
        assert full, f"{lane} refused at {at} with room: {[c.at for c in self.calls]}"

    def check_grants(self, at: float, lanes: list[str]) -> None:
        """The grants of this instant (already in `calls`) fit some serving order."""
        before = [self.inside(at, i) - len(lanes) for i in range(len(self.windows))]
        slack = sorted(
            min(self.ceiling(lane, i) - before[i] for i in range(len(self.windows)))
            for lane in lanes
        )
        for position, room in enumerate(slack):
            assert room > position, (
                f"over a ceiling at {at}: lanes {lanes}, slack {slack}, "
                f"calls {[c.at for c in self.calls]}"
            )


def reserves_for(
    windows: Sequence[Window], fractions: tuple[float, float]
) -> dict[str, tuple[int, ...]]:
    jobs, refreshes = (
        tuple(min(w.limit - 1, int(f * w.limit)) for w in windows) for f in fractions
    )
    return {MISSES: (0,) * len(windows), JOBS: jobs, REFRESHES: refreshes}


async def drive(
    budgets: Sequence[Budget],
    clock: FakeClock,
    model: Model,
    steps: list[tuple[float, list[tuple[int, tuple[str, ...]]], int, int]],
) -> None:
    for advance, calls, sends, refunds in steps:
        clock.advance(advance)
        at = clock()
        for call in [c for c in model.calls if not c.sent][:sends]:
            await budgets[call.process].stamp(call.ticket, call.lane)
            call.at, call.sent = at, True
        for call in [c for c in model.calls if not c.sent][-refunds:] if refunds else []:
            await budgets[call.process].refund(call.ticket)
            await budgets[call.process].refund(call.ticket)  # twice: still one call freed
            model.calls.remove(call)
        asks = [[Ask(lane, model.reserves[lane]) for lane in lanes] for _, lanes in calls]
        grants = await asyncio.gather(
            *(
                budgets[which % len(budgets)].try_spend(a)
                for (which, _), a in zip(calls, asks, strict=True)
            )
        )
        granted: list[str] = []
        for (which, lanes), grant in zip(calls, grants, strict=True):
            if grant.ticket is not None:
                assert grant.lane in lanes
                model.calls.append(Call(grant.ticket, grant.lane, at, which % len(budgets)))
                granted.append(grant.lane)
        model.check_grants(at, granted)
        for (_, lanes), grant in zip(calls, grants, strict=True):
            passed_over = lanes if grant.lane is None else lanes[: lanes.index(grant.lane)]
            for lane in passed_over:
                model.check_refused(at, lane, len(granted))


def as_windows(drawn: list[tuple[int, int, int]]) -> list[Window]:
    return [
        Window(f"w{i}", limit, period_ms / 1000, margin_ms / 1000)
        for i, (limit, period_ms, margin_ms) in enumerate(drawn)
    ]


@settings(max_examples=150, deadline=None)
@given(
    drawn=WINDOWS,
    fractions=RESERVES,
    steps=st.lists(STEP, min_size=1, max_size=40),
    start=st.floats(0, 10, allow_nan=False),
)
def test_in_process_no_lane_passes_its_ceiling_and_nothing_is_refused_with_room(
    drawn: list[tuple[int, int, int]],
    fractions: tuple[float, float],
    steps: list[tuple[float, list[tuple[int, tuple[str, ...]]], int, int]],
    start: float,
) -> None:
    windows = as_windows(drawn)
    clock = FakeClock(1_000.0 + start)
    model = Model(windows, reserves_for(windows, fractions))
    asyncio.run(drive([LocalBudget(windows, clock=clock)], clock, model, steps))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    drawn=WINDOWS,
    fractions=RESERVES,
    steps=st.lists(STEP, min_size=1, max_size=30),
    start=st.floats(0, 10, allow_nan=False),
)
def test_on_redis_two_processes_keep_every_lane_under_its_ceiling(
    redis_server: RedisServer,
    drawn: list[tuple[int, int, int]],
    fractions: tuple[float, float],
    steps: list[tuple[float, list[tuple[int, tuple[str, ...]]], int, int]],
    start: float,
) -> None:
    windows = as_windows(drawn)
    clock = FakeClock(1_800_000_000.0 + start)
    model = Model(windows, reserves_for(windows, fractions))
    prefix = secrets.token_hex(4)

    async def run() -> None:
        budgets = [redis_budget(redis_server.url, windows, clock, prefix) for _ in range(2)]
        try:
            await drive(budgets, clock, model, steps)
        finally:
            for budget in budgets:
                await budget.redis.aclose()  # type: ignore[attr-defined]

    asyncio.run(run())
