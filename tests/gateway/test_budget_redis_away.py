"""The shared budget while Redis is away, the fault injected for real: the redis-server is
stopped (SIGKILL; started again empty: it keeps nothing on disk, like the compose file's)
or frozen (SIGSTOP) and brought back.

Two `RedisBudget`s on their own connections are two processes of one deployment. Each call
one of them grants is a call to Freelancer at that instant: the test's `freelancer` list is
what Freelancer would count. Time is a `FakeClock` the test steps (the windows' arithmetic
runs on it, in Redis too), so a minute passes at once.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest

from app.coordination import redis_budget
from app.coordination.client import connect
from app.coordination.redis_budget import RedisBudget
from app.gateway.budget import MISSES, Ask, Window
from tests.support.clock import FakeClock
from tests.support.procs import RedisServer
from tests.support.simulation import busiest

MINUTE = Window("minute", 10, 60.0)
HOUR = Window("hour", 30, 3600.0)


@dataclass
class Deployment:
    """Two processes sharing one budget, and the calls Freelancer received from them."""

    clock: FakeClock
    processes: list[RedisBudget]
    freelancer: list[tuple[float, int]] = field(default_factory=list)
    """(time, which process) of every call."""

    async def flood(self, which: int, at_most: int = 100) -> int:
        """Process `which` calls until its budget says no (bounded): how many it made."""
        made = 0
        for _ in range(at_most):
            grant = await self.processes[which].try_spend([Ask(MISSES)])
            if grant.ticket is None:
                return made
            self.freelancer.append((self.clock(), which))
            made += 1
        return made

    def busiest(self, period_s: float) -> int:
        return busiest([at for at, _ in self.freelancer], period_s)

    async def reconnect(self) -> None:
        """Wait (bounded) until both processes spend from Redis again: at their next call
        (their retry pause is 0 in these tests), or after the grace that follows a lost log."""
        for _ in range(100):
            for budget in self.processes:
                await budget.refresh()
            if all(b._local is None for b in self.processes):
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the processes did not reach Redis again")


@pytest.fixture
def no_retry_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process tries Redis again at its next call (2 s of real time otherwise), and trusts
    a log that was lost after 0.2 s (4 s otherwise)."""
    monkeypatch.setattr(redis_budget, "RETRY_AFTER_FAILURE_S", 0.0)
    monkeypatch.setattr(redis_budget, "GRACE_S", 0.2)


@pytest.fixture
async def deployment(redis_server: RedisServer, no_retry_pause: None) -> AsyncIterator[Deployment]:
    clock = FakeClock(1_800_000_000.0)
    prefix = secrets.token_hex(4)
    seen = [2]
    budgets = [
        RedisBudget(
            connect(redis_server.url, 0.15),
            [MINUTE, HOUR],
            prefix=prefix,
            timeout_s=0.15,
            processes=lambda: seen[0],
            clock=clock,
        )
        for _ in range(2)
    ]
    yield Deployment(clock, budgets)
    for budget in budgets:
        await budget.redis.aclose()


@pytest.fixture(params=["stopped", "frozen"])
def outage(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Outage]:
    """Takes Redis away and brings it back, one way or the other."""
    fault: str = request.param
    yield Outage(redis_server, fault)
    if fault == "frozen":
        redis_server.thaw()


@dataclass
class Outage:
    server: RedisServer
    fault: str

    def begin(self) -> None:
        if self.fault == "stopped":
            self.server.stop()
        else:
            self.server.freeze()

    def end(self) -> None:
        if self.fault == "stopped":
            self.server.start()  # empty: what the log held before is gone
        else:
            self.server.thaw()


async def both_read(deployment: Deployment) -> None:
    """Each process reads the shared log (the gateway does every SYNC_S while idle)."""
    for budget in deployment.processes:
        await budget.refresh()


async def test_while_redis_is_away_each_process_spends_its_share_of_what_was_left(
    deployment: Deployment, outage: Outage
) -> None:
    assert await deployment.flood(0, at_most=4) == 4
    assert await deployment.flood(1, at_most=2) == 2
    await both_read(deployment)
    outage.begin()
    deployment.clock.advance(1.0)
    # 4 of the minute's 10 are left; two processes seen: 2 each (5 less its 3 of the 6).
    assert [await deployment.flood(0), await deployment.flood(1)] == [2, 2]
    assert deployment.busiest(60.0) == 10


async def test_after_redis_is_back_the_windows_count_the_calls_made_without_it(
    deployment: Deployment, outage: Outage
) -> None:
    await deployment.flood(0, at_most=4)
    await deployment.flood(1, at_most=2)
    await both_read(deployment)
    outage.begin()
    deployment.clock.advance(1.0)
    await deployment.flood(0)
    await deployment.flood(1)
    deployment.clock.advance(29.0)
    outage.end()
    await deployment.reconnect()
    # Half a minute later: the minute still holds the 6 from before and the 4 from during.
    assert [await deployment.flood(0), await deployment.flood(1)] == [0, 0]
    windows = {w.name: w for w in deployment.processes[1].windows()}
    assert (windows["minute"].used, windows["hour"].used) == (10, 10)
    deployment.clock.advance(30.5)  # the first 6 have left the minute, the other 4 not
    assert await deployment.flood(0) + await deployment.flood(1) == 6
    assert deployment.busiest(60.0) == 10 and deployment.busiest(3600.0) <= 30


async def test_a_429_seen_while_redis_is_away_pauses_every_process_once_it_is_back(
    deployment: Deployment, outage: Outage
) -> None:
    await both_read(deployment)
    outage.begin()
    await deployment.processes[0].pause(30.0)  # Freelancer said 429, Retry-After 30, to one
    assert await deployment.flood(0) == 0
    outage.end()
    await deployment.reconnect()
    deployment.clock.advance(10.0)
    grant = await deployment.processes[1].try_spend([Ask(MISSES)])
    assert grant.ticket is None and grant.held_by == ("pause",)
    assert grant.waits_s[0] == pytest.approx(20.0, abs=0.01)
    deployment.clock.advance(20.0)
    assert await deployment.flood(1, at_most=1) == 1


async def test_a_refund_of_a_call_made_without_redis_frees_it_once_charged(
    deployment: Deployment, outage: Outage
) -> None:
    await both_read(deployment)
    outage.begin()
    ticket = (await deployment.processes[0].try_spend([Ask(MISSES)])).ticket
    assert ticket is not None
    outage.end()
    await deployment.reconnect()  # the call is charged to Redis
    await deployment.processes[0].refund(ticket)  # its batch came out empty: not made
    await deployment.processes[1].refresh()
    assert [w.used for w in deployment.processes[1].windows()] == [0, 0]


async def test_two_processes_flooding_through_outages_never_exceed_a_window(
    deployment: Deployment, outage: Outage
) -> None:
    """Both processes call whenever their budget lets them, a second apart, for three
    minutes and a half, while Redis goes away twice for 15 s."""
    for second in range(210):
        if second in (30, 120):  # away for 15 s, twice
            outage.begin()
        if second in (45, 135):
            outage.end()
        await asyncio.gather(deployment.flood(0, 3), deployment.flood(1, 3))
        if second % 2 == 0:
            await both_read(deployment)
        deployment.clock.advance(1.0)
    assert deployment.busiest(60.0) <= 10 and deployment.busiest(3600.0) <= 30
    assert len(deployment.freelancer) >= 25, "and the budget was used"
