"""The `Budget` contract on a fake clock: windows, waits, a 429's pause, what is left.

Every implementation runs the same suite; today the in-process `LocalBudget`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
from redis.asyncio import Redis

from app.gateway.budget import Budget, LocalBudget, Window, budget_windows
from bench.procs import RedisServer
from tests.clock import FakeClock
from tests.conftest import make_settings

MINUTE = Window("minute", limit=60, period_s=60, burst=3)
HOUR = Window("hour", limit=100, period_s=3600, burst=100)

MakeBudget = Callable[[Sequence[Window], FakeClock], Budget]


@pytest.fixture(params=["local", "redis"])
async def make_budget(request: pytest.FixtureRequest) -> AsyncIterator[MakeBudget]:
    """A budget on the test's clock: in-process, or shared through a real redis-server."""
    if request.param == "local":
        yield lambda windows, clock: LocalBudget(windows, clock=clock)
        return
    from app.coordination.budget import RedisBudget
    from app.coordination.client import connect

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
    assert budget.wait_s() == pytest.approx(1.0)  # 60 a minute: one a second
    clock.advance(1.0)
    assert not budget.throttled
    await budget.refresh()
    assert [w.remaining for w in budget.windows()] == [1]


async def test_every_window_is_enforced_and_reported(make_budget: MakeBudget) -> None:
    clock = FakeClock()
    budget = make_budget([MINUTE, HOUR], clock)
    await budget.refresh()
    assert [(w.name, w.limit, w.remaining) for w in budget.windows()] == [
        ("minute", 60, 3),
        ("hour", 100, 100),
    ]
    for _ in range(33):  # 99 calls in 33 minutes: the minute window never binds for long
        await spend(budget, clock, 3)
        clock.advance(3.0)
    await budget.refresh()
    hour = budget.windows()[1]
    assert hour.remaining < 10, "the hour window counts every call"
    await spend(budget, clock, hour.remaining)
    assert budget.throttled
    assert budget.wait_s() > 3.0, "the hour window, not the minute, holds the next call"


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


def test_the_settings_give_a_per_minute_window(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, upstream_rate_per_min=50, upstream_burst=10)
    assert budget_windows(settings) == [Window("minute", 50, 60.0, 10)]
