"""Attacks on the budget's promises, each written down as a test: a call that could leave
without a ticket, two processes on Redis flooding Freelancer, and a crawl against clients
over a simulated hour. Calls are counted where Freelancer counts them, at its door."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from app.coordination.client import connect
from app.coordination.redis_budget import RedisBudget
from app.coordination.redis_coordinator import RedisCoordinator
from app.errors import UpstreamCircuitOpen
from app.gateway import Gateway
from app.gateway.batching import BatchQueue
from app.gateway.breaker import CircuitBreaker
from app.gateway.budget import MISSES, LocalBudget, Window
from app.gateway.planner import Planner
from app.gateway.resilient import ResilientUpstream
from app.gateway.stats import GatewayStats
from app.store import SqliteUserStore
from app.upstream import FreelancerClient
from tests.support.apps import make_settings
from tests.support.freelancer import API, FakeFreelancer, SlowUpstream
from tests.support.procs import RedisServer
from tests.support.simulation import JOB_IDS, Simulation, busiest, simulate


async def test_no_call_leaves_without_a_ticket_when_the_breaker_turns_half_open_meanwhile(
    tmp_path: Path,
) -> None:
    """The breaker's state is read twice (is it rejecting? may this call go?); between the
    two its cooldown can end. The call must then not go out unbudgeted."""
    ticks = iter([0.0, 5.0, 11.0, 11.0, 11.0, 11.0])  # open at 0; read at 5, then past 10
    breaker = CircuitBreaker(failures=1, cooldown_s=10, clock=lambda: next(ticks))
    breaker.record_failure()
    settings = make_settings(tmp_path)
    budget = LocalBudget([Window("minute", 5, 60.0)])
    upstream = SlowUpstream(delay_s=0)
    resilient = ResilientUpstream(
        upstream,
        Planner(budget, BatchQueue(100), settings),
        breaker=breaker,
        stats=GatewayStats(),
        settings=settings,
    )
    with pytest.raises(UpstreamCircuitOpen):
        await resilient.fetch_users([1], MISSES, ticket=None)
    assert upstream.calls == [], "no call without a ticket"
    assert [w.used for w in budget.windows()] == [0]


class TimedFreelancer(FakeFreelancer):
    """The fake Freelancer, noting when each call arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[float] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.arrivals.append(time.monotonic())
        return await super().handle(request)


StartProcess = Callable[[TimedFreelancer], Awaitable[Gateway]]
FAST = [Window("minute", 6, 2.0, 0.05), Window("hour", 15, 8.0, 0.05)]
"""Windows of 2 s and 8 s (6 and 15 calls), so a real-time run crosses many of them."""


@pytest.fixture
async def start_process(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[StartProcess]:
    """Gateways of one deployment: each its own Redis connections (a process, to Redis)."""
    started: list[tuple[Gateway, httpx.AsyncClient]] = []
    settings = make_settings(
        tmp_path,
        upstream_reserve_per_min=2,
        upstream_reserve_per_hour=4,
        upstream_burst=2,
        wait_timeout_s=1.0,
        batch_window_ms=0,
    )

    async def start(freelancer: TimedFreelancer) -> Gateway:
        redis = connect(redis_server.url, 1.0)
        coordinator = RedisCoordinator(redis, prefix="red", lease_s=2.0, timeout_s=1.0)
        budget = RedisBudget(
            redis, FAST, prefix="red", timeout_s=1.0, processes=lambda: coordinator.live_processes
        )
        http = httpx.AsyncClient(transport=freelancer.transport)
        gateway = Gateway(
            settings=settings,
            store=SqliteUserStore(tmp_path / "users.db"),
            upstream=FreelancerClient(http, base_url=API),
            budget=budget,
            coordinator=coordinator,
        )
        await gateway.start()
        started.append((gateway, http))
        return gateway

    yield start
    for gateway, http in started:
        await gateway.stop()
        await http.aclose()


async def test_two_processes_on_redis_flooding_never_put_freelancer_over_a_window(
    start_process: StartProcess,
) -> None:
    """Both processes take a flood of new ids from clients and a crawl's ids for 12 s of
    real time (six of the 2 s windows, one and a half of the 8 s one)."""
    freelancer = TimedFreelancer()
    processes = [await start_process(freelancer), await start_process(freelancer)]
    began = time.monotonic()
    next_id = iter(range(1, 1_000_000))

    async def clients(gateway: Gateway) -> None:
        while time.monotonic() - began < 12:
            ids = [next(next_id) for _ in range(3)]
            await asyncio.gather(gateway.lookup(ids), asyncio.sleep(0.05))

    async def crawl(gateway: Gateway) -> None:
        while time.monotonic() - began < 12:
            fetches = gateway.enlist([JOB_IDS + next(next_id) for _ in range(100)], {})
            futures = {f.future for f in fetches.values() if f is not None}
            await asyncio.wait(futures, timeout=1.0)

    await asyncio.gather(*(clients(p) for p in processes), crawl(processes[0]))
    arrivals = freelancer.arrivals
    assert busiest(arrivals, 2.0) <= 6 and busiest(arrivals, 8.0) <= 15, arrivals
    assert len(arrivals) >= 20, "the windows were used, again and again"
    assert any(call[0] >= JOB_IDS for call in freelancer.calls), "the crawl got calls too"


@pytest.mark.sim
def test_over_an_hour_a_crawl_never_makes_clients_wait_and_is_not_starved(
    tmp_path: Path,
) -> None:
    """A crawl that would take every call, and clients arriving in bursts of ten new ids
    (the minute's reserve) every five minutes: each client is answered at once (its wait
    is the calls' 0.1 s, three rounds of UPSTREAM_CONCURRENCY at most: never the budget's
    seconds), and the crawl still gets its pace's calls."""

    async def scenario(sim: Simulation) -> None:
        await sim.submit_job(JOB_IDS, 1_000_000)
        await asyncio.sleep(30)
        for burst in range(12):
            ids = range(burst * 1000 + 1, burst * 1000 + 1001, 100)
            await asyncio.gather(*(sim.miss(range(i, i + 100)) for i in ids))
            await asyncio.sleep(300)

    sim = simulate(tmp_path, scenario)
    waits = sim.miss_waits
    assert len(waits) == 120 and max(waits) <= 0.31, statistics.quantiles(waits, n=10)
    times = sim.freelancer.times()
    assert busiest(times, 60.0) <= 50 and busiest(times, 3600.0) <= 1000
    # 10 back to back, then one every 4.5 s (800 an hour less the clients' share of it).
    assert len(sim.freelancer.times("jobs")) >= 650
