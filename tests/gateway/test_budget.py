"""The `Budget` contract on a fake clock: windows, waits, a 429's pause, what is left.

Every implementation runs the same suite; today the in-process `LocalBudget`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
from redis.asyncio import Redis

from app.gateway.budget import Budget, LocalBudget, Window, budget_windows
from tests.support.apps import make_settings
from tests.support.clock import FakeClock
from tests.support.procs import RedisServer

MINUTE = Window("minute", limit=63, period_s=60, burst=3)  # a burst of 3, then one a second
HOUR = Window("hour", limit=100, period_s=3600, burst=50)

MakeBudget = Callable[[Sequence[Window], FakeClock], Budget]


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
async def make_budget(request: pytest.FixtureRequest) -> AsyncIterator[MakeBudget]:
    """A budget on the test's clock: in-process, or shared through a real redis-server."""
    if request.param == "local":
        yield lambda windows, clock: LocalBudget(windows, clock=clock)
        return
    from app.coordination.client import connect
    from app.coordination.redis_budget import RedisBudget

    server: RedisServer = request.getfixturevalue("redis_server")
    clients: list[Redis] = []

    def shared(windows: Sequence[Window], clock: FakeClock) -> Budget:
        clients.append(connect(server.url, 1.0))
        return RedisBudget(
            clients[-1], windows, prefix="test", timeout_s=1.0, processes=lambda: 1, clock=clock
        )

    yield shared
    for client in clients:
        await client.aclose()


async def spend(budget: Budget, clock: FakeClock, calls: int) -> None:
    """Spend `calls` calls that are allowed now (acquire must not wait)."""
    for _ in range(calls):
        assert budget.wait_s() == 0.0
        await budget.acquire()


async def test_a_burst_is_allowed_then_calls_wait_for_the_rate(
    make_budget: MakeBudget,
) -> None:
    clock = FakeClock()
    budget = make_budget([MINUTE], clock)
    await spend(budget, clock, 3)
    assert budget.throttled
    assert budget.wait_s() == pytest.approx(1.0)  # 63 - 3 a minute: one a second
    clock.advance(1.0)
    assert not budget.throttled
    await budget.refresh()
    assert [w.remaining for w in budget.windows()] == [1]


async def test_every_window_is_enforced_and_reported(make_budget: MakeBudget) -> None:
    clock = FakeClock()
    budget = make_budget([MINUTE, HOUR], clock)
    await budget.refresh()
    assert [(w.name, w.limit, w.remaining) for w in budget.windows()] == [
        ("minute", 63, 3),
        ("hour", 100, 50),
    ]
    # A caller that always calls as soon as it may, for two hours.
    calls: list[float] = []
    began = clock()
    while clock() - began < 7200 and len(calls) < 500:
        clock.advance(budget.wait_s() + 0.001)
        await budget.acquire()
        calls.append(clock() - began)
    for window in (MINUTE, HOUR):
        busiest = max(
            sum(1 for t in calls[i:] if t < start + window.period_s)
            for i, start in enumerate(calls)
        )
        assert busiest <= window.limit, f"{busiest} calls in one {window.name}"
    in_first_hour = sum(1 for t in calls if t < 3600)
    assert 95 <= in_first_hour <= 100, "the hour window, not the minute, binds a long run"
    await budget.refresh()
    assert budget.windows()[1].remaining == 0


async def test_a_429_pauses_every_caller(make_budget: MakeBudget) -> None:
    clock = FakeClock()
    budget = make_budget([MINUTE], clock)
    await budget.pause(30.0)
    assert budget.throttled
    assert budget.wait_s() == pytest.approx(30.0)
    clock.advance(30.0)
    assert budget.wait_s() == 0.0


async def test_freelancers_remaining_count_caps_the_shortest_window(
    make_budget: MakeBudget,
) -> None:
    clock = FakeClock()
    budget = make_budget([MINUTE, HOUR], clock)
    await budget.observe_remaining(0)
    assert budget.throttled
    assert budget.wait_s() > 0


def test_the_settings_give_a_minute_and_an_hour_window(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, upstream_rate_per_min=50, upstream_rate_per_hour=1000, upstream_burst=10
    )
    assert budget_windows(settings) == [
        Window("minute", 50, 60.0, 10),
        Window("hour", 1000, 3600.0, 10),
    ]
    # A burst larger than a window is cut to fit it: that window still never goes over.
    small = make_settings(tmp_path, upstream_rate_per_min=5, upstream_burst=10)
    assert budget_windows(small)[0] == Window("minute", 5, 60.0, 4)
