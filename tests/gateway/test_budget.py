"""The `Budget` contract, run against both implementations: the in-process `LocalBudget`
and the `RedisBudget` on a real redis-server (two of them where it matters: two processes).

Time is a `FakeClock` (fractional seconds); the reference model is a plain list of the
granted calls' times: no window may ever hold more than its limit in any span of its
period, and a refusal must mean a window (read to the millisecond, on the safe side) is full.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from app.gateway.budget import (
    JOBS,
    MISSES,
    REFRESHES,
    Ask,
    Budget,
    LocalBudget,
    Window,
    budget_windows,
)
from tests.support.apps import make_settings
from tests.support.clock import FakeClock
from tests.support.procs import RedisServer
from tests.support.simulation import busiest

MINUTE = Window("minute", 5, 60.0)
HOUR = Window("hour", 8, 3600.0)

MakeBudget = Callable[[Sequence[Window], FakeClock], Budget]


def redis_budget(url: str, windows: Sequence[Window], clock: FakeClock, prefix: str) -> Budget:
    """A RedisBudget on its own connection (a process of its own, as Redis sees it)."""
    from app.coordination.client import connect
    from app.coordination.redis_budget import RedisBudget

    return RedisBudget(
        connect(url, 2.0),
        windows,
        prefix=prefix,
        timeout_s=2.0,
        processes=lambda: 1,
        clock=clock,
    )


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
async def make_budget(request: pytest.FixtureRequest) -> AsyncIterator[MakeBudget]:
    """Budgets on the test's clock: in-process, or sharing one log on a real redis-server
    (each one its own connection: budgets made in one test are processes of one deployment)."""
    if request.param == "local":
        shared: LocalBudget | None = None

        def local(windows: Sequence[Window], clock: FakeClock) -> Budget:
            nonlocal shared  # in one process, every caller holds the same budget
            shared = shared or LocalBudget(windows, clock=clock)
            return shared

        yield local
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    made: list[Budget] = []
    prefix = secrets.token_hex(4)

    def shared_redis(windows: Sequence[Window], clock: FakeClock) -> Budget:
        made.append(redis_budget(server.url, windows, clock, prefix))
        return made[-1]

    yield shared_redis
    for budget in made:
        redis: Redis = budget.redis  # type: ignore[attr-defined]
        await redis.aclose()


async def spend(budget: Budget, lane: str = MISSES, reserve: tuple[int, ...] = ()) -> str | None:
    grant = await budget.try_spend([Ask(lane, reserve)])
    return grant.ticket


async def test_a_window_gives_its_whole_limit_at_once_then_one_as_each_call_leaves(
    make_budget: MakeBudget,
) -> None:
    clock = FakeClock(1000.0)
    budget = make_budget([MINUTE], clock)
    for _ in range(5):
        assert await spend(budget) is not None, "the limit is there at once, no pacing"
        clock.advance(1.0)
    grant = await budget.try_spend([Ask(MISSES)])
    assert grant.ticket is None and grant.held_by == ("minute",)
    assert grant.waits_s[0] == pytest.approx(55.0), "the first call leaves at 1060.0"
    clock.advance(54.999)
    assert await spend(budget) is None
    clock.advance(0.001)
    assert await spend(budget) is not None, "at exactly 60 s the first call is out"
    assert await spend(budget) is None


async def test_fractional_times_are_read_to_the_millisecond_on_the_safe_side(
    make_budget: MakeBudget,
) -> None:
    clock = FakeClock(1.0004)  # logged as 1.001 s: a window can only look fuller
    budget = make_budget([Window("second", 1, 1.0)], clock)
    assert await spend(budget) is not None
    clock.now = 2.0004  # exactly one period later in real time: read as 2.000 < 1.001 + 1
    grant = await budget.try_spend([Ask(MISSES)])
    assert grant.ticket is None and grant.waits_s[0] == pytest.approx(0.001)
    clock.now = 2.001
    assert await spend(budget) is not None


async def test_the_hour_is_a_cap_not_a_pace(make_budget: MakeBudget) -> None:
    clock = FakeClock()
    budget = make_budget([MINUTE, HOUR], clock)
    assert [await spend(budget) is not None for _ in range(6)] == [True] * 5 + [False]
    clock.advance(60)
    assert [await spend(budget) is not None for _ in range(4)] == [True] * 3 + [False]
    grant = await budget.try_spend([Ask(MISSES)])
    assert grant.held_by == ("hour",)
    assert grant.waits_s[0] == pytest.approx(3540.0), "until the hour's first call leaves"
    await budget.refresh()
    assert [(w.name, w.used, w.remaining) for w in budget.windows()] == [
        ("minute", 3, 2),
        ("hour", 8, 0),
    ]
    assert [w.next_call_in_s for w in budget.windows()] == [0.0, pytest.approx(3540.0)]


async def test_a_reserve_is_left_to_the_lanes_that_ask_without_one(
    make_budget: MakeBudget,
) -> None:
    clock = FakeClock()
    budget = make_budget([MINUTE, HOUR], clock)
    background = (2, 3)  # leave 2 of the minute and 3 of the hour
    granted = [await spend(budget, JOBS, background) is not None for _ in range(4)]
    assert granted == [True, True, True, False], "5 - 2 of the minute"
    grant = await budget.try_spend([Ask(REFRESHES, background), Ask(MISSES)])
    assert grant.lane == MISSES and grant.held_by == ("minute", None)
    assert await spend(budget) is not None
    assert await spend(budget) is None
    clock.advance(60)
    granted = [await spend(budget, JOBS, background) is not None for _ in range(2)]
    assert granted == [False, False], "the hour has 5 - 3 left for jobs: none"
    assert await spend(budget) is not None
    await budget.refresh()
    assert budget.lane_calls() == {MISSES: 3, JOBS: 3, REFRESHES: 0}


async def test_a_refunded_call_leaves_the_log(make_budget: MakeBudget) -> None:
    clock = FakeClock()
    budget = make_budget([Window("minute", 1, 60.0)], clock)
    ticket = await spend(budget)
    assert ticket is not None and await spend(budget) is None
    await budget.refund(ticket)
    assert await spend(budget) is not None


async def test_a_refund_frees_the_one_call_it_took_once_and_nothing_else(
    make_budget: MakeBudget,
) -> None:
    clock = FakeClock()
    budget = make_budget([Window("minute", 2, 60.0)], clock)
    first, second = await spend(budget), await spend(budget)
    assert first is not None and second is not None and await spend(budget) is None
    await budget.refund(first)
    await budget.refund(first)  # twice: still one call freed
    await budget.refund("someone-else:7")  # a ticket it never gave: nothing
    third = await spend(budget)
    assert third is not None and await spend(budget) is None
    await budget.refresh()
    assert [(w.used, w.remaining) for w in budget.windows()] == [(2, 0)]


async def test_a_call_counts_from_when_it_is_sent_and_a_margin_widens_the_window(
    make_budget: MakeBudget,
) -> None:
    clock = FakeClock(1000.0)
    budget = make_budget([Window("minute", 1, 60.0, 0.5)], clock)
    ticket = await spend(budget)
    assert ticket is not None
    clock.advance(2.0)
    await budget.stamp(ticket, MISSES)  # granted at 1000, sent at 1002
    clock.advance(58.0)
    grant = await budget.try_spend([Ask(MISSES)])
    assert grant.ticket is None and grant.waits_s[0] == pytest.approx(2.5), "1002 + 60 + 0.5"
    clock.advance(2.499)
    assert await spend(budget) is None
    clock.advance(0.001)
    assert await spend(budget) is not None
    await budget.refresh()
    assert [(w.period_s, w.margin_s, w.used) for w in budget.windows()] == [(60.0, 0.5, 1)]


async def test_a_429_pauses_every_caller_and_shows_in_every_window(
    make_budget: MakeBudget,
) -> None:
    clock = FakeClock()
    budget = make_budget([MINUTE, HOUR], clock)
    await budget.pause(30.0)
    assert budget.throttled and budget.wait_s() == pytest.approx(30.0)
    grant = await budget.try_spend([Ask(MISSES), Ask(JOBS, (1, 1))])
    assert grant.ticket is None and grant.held_by == ("pause", "pause")
    clock.advance(30.0)
    await budget.refresh()
    assert budget.wait_s() == 0.0 and await spend(budget) is not None


async def test_freelancer_saying_nothing_is_left_pauses_everyone(make_budget: MakeBudget) -> None:
    clock = FakeClock()
    budget = make_budget([MINUTE, HOUR], clock)
    await budget.observe_remaining(0)
    assert budget.throttled
    assert await spend(budget) is None


async def test_two_processes_sharing_eleven_a_minute_never_make_twelve(
    make_budget: MakeBudget,
) -> None:
    """The issue's measurement (17 calls in 60 s from two processes sharing 11 a minute):
    both flood for three minutes, waking a fraction of a millisecond after their wait."""
    clock = FakeClock(1_800_000_000.0004)
    windows = [Window("minute", 11, 60.0), Window("hour", 1000, 3600.0)]
    processes = [make_budget(windows, clock), make_budget(windows, clock)]
    calls: list[float] = []
    began = clock()
    while clock() - began < 180:
        grants = await asyncio.gather(*(b.try_spend([Ask(MISSES)]) for b in processes))
        calls += [clock()] * sum(g.ticket is not None for g in grants)
        clock.advance(min(max(g.waits_s[0] for g in grants), 5.0) + 0.0003)
    assert busiest(calls, 60.0) == 11
    assert len(calls) >= 33, "and the limit is used, minute after minute"


def test_the_settings_give_a_minute_and_an_hour_window_of_whole_calls_and_a_margin(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, upstream_rate_per_min=50.5, upstream_rate_per_hour=1000)
    assert budget_windows(settings) == [
        Window("minute", 50, 60.0, 1.0),
        Window("hour", 1000, 3600.0, 1.0),
    ]
    settings = make_settings(tmp_path, upstream_window_margin_s=0.25)
    assert [w.span_ms for w in budget_windows(settings)] == [60_250, 3_600_250]


def test_a_reserve_as_large_as_its_window_is_refused_with_the_settings_named(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match=r"UPSTREAM_RESERVE_PER_HOUR .* UPSTREAM_RATE_PER_HOUR"):
        make_settings(tmp_path, upstream_rate_per_hour=100, upstream_reserve_per_hour=100)


# ---- the reference model --------------------------------------------------------------

WINDOWS = st.lists(
    st.tuples(st.integers(1, 6), st.integers(1, 20_000)),  # limit, period in ms
    min_size=1,
    max_size=3,
)
CALLERS = st.lists(st.tuples(st.integers(0, 1), st.booleans()), min_size=1, max_size=4)
"""Callers at one instant: which budget (process) each asks, and whether it keeps a reserve."""
STEPS = st.lists(
    st.tuples(st.floats(0, 8.0, allow_nan=False), CALLERS),  # seconds to advance, callers
    min_size=1,
    max_size=40,
)
Served = tuple[float, bool, bool, float, bool]
"""(time, reserve kept, granted, wait in s, alone at its instant) per ask, as served."""


def check_against_the_model(windows: Sequence[Window], served: list[Served]) -> None:
    """Replay the asks on a list of call times: no window over its limit in any span; a
    refusal only when a window (read 1 ms wider: the safe side) holds the ask's ceiling,
    and a wait no longer than the model's (within the 2 ms the rounding allows)."""
    calls: list[float] = []
    for at, reserve, granted, wait_s, alone in served:
        ceilings = [w.limit - (min(1, w.limit - 1) if reserve else 0) for w in windows]
        if granted:
            calls.append(at)
            for w in windows:
                inside = sum(1 for c in calls if at - w.period_s < c <= at)
                assert inside <= w.limit, f"{inside} calls in one {w.name}: {calls}"
            continue
        full = [
            sum(1 for c in calls if at - w.period_s - 0.001 < c <= at) >= ceiling
            for w, ceiling in zip(windows, ceilings, strict=True)
        ]
        assert any(full), f"refused at {at} with room in every window: {calls}"
        exact = max(
            sorted(c for c in calls if c > at - w.period_s - 0.001)[-ceiling] + w.period_s
            for w, ceiling, is_full in zip(windows, ceilings, full, strict=True)
            if is_full
        )
        assert at + wait_s <= exact + 0.002 + 1e-6, (at, wait_s, exact, calls)
        if alone:  # with others at the same instant, it may have been served before them
            assert at + wait_s >= exact - 1e-6, (at, wait_s, exact, calls)


async def drive(
    budgets: Sequence[Budget], clock: FakeClock, steps: list[tuple[float, list[tuple[int, bool]]]]
) -> list[Served]:
    """Run the steps: concurrent callers at each instant, on one budget or several."""
    windows = budgets[0].limits
    background = tuple(min(1, w.limit - 1) for w in windows)
    served: list[Served] = []
    for advance, callers in steps:
        clock.advance(advance)
        at = clock()
        grants = await asyncio.gather(
            *(
                budgets[which % len(budgets)].try_spend(
                    [Ask(JOBS, background) if reserve else Ask(MISSES)]
                )
                for which, reserve in callers
            )
        )
        # Granted asks were served before the refused ones could see them (or the same).
        asks = sorted(zip(callers, grants, strict=True), key=lambda pair: pair[1].ticket is None)
        for (_, reserve), grant in asks:
            served.append(
                (at, reserve, grant.ticket is not None, grant.waits_s[0], len(callers) == 1)
            )
    return served


def as_windows(drawn: list[tuple[int, int]]) -> list[Window]:
    return [Window(f"w{i}", limit, period_ms / 1000) for i, (limit, period_ms) in enumerate(drawn)]


@settings(max_examples=80, deadline=None)
@given(drawn=WINDOWS, steps=STEPS, start=st.floats(0, 10, allow_nan=False))
def test_in_process_no_window_is_exceeded_and_no_call_refused_with_room(
    drawn: list[tuple[int, int]], steps: list[tuple[float, list[tuple[int, bool]]]], start: float
) -> None:
    windows = as_windows(drawn)
    clock = FakeClock(1_000.0 + start)
    budget = LocalBudget(windows, clock=clock)
    check_against_the_model(windows, asyncio.run(drive([budget], clock, steps)))


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(drawn=WINDOWS, steps=STEPS, start=st.floats(0, 10, allow_nan=False))
def test_on_redis_two_processes_never_exceed_a_window_nor_refuse_with_room(
    redis_server: RedisServer,
    drawn: list[tuple[int, int]],
    steps: list[tuple[float, list[tuple[int, bool]]]],
    start: float,
) -> None:
    windows = as_windows(drawn)
    clock = FakeClock(1_800_000_000.0 + start)
    prefix = secrets.token_hex(4)

    async def run() -> list[Served]:
        budgets = [redis_budget(redis_server.url, windows, clock, prefix) for _ in range(2)]
        try:
            return await drive(budgets, clock, steps)
        finally:
            for budget in budgets:
                await budget.redis.aclose()  # type: ignore[attr-defined]

    check_against_the_model(windows, asyncio.run(run()))
