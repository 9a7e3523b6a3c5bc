"""Red team of refresh-ahead across processes (issue 19): a lead that moves while the old
leader's refresh is queued or its look is under way, with its link to Redis cut, and
processes whose clocks differ sharing their counts.

Gateways run in this process, each with its own Redis connections through its own
loopback proxy (`tests.support.redis_proxy`): to Redis they are separate processes. The
users' freshness runs on a `FakeClock` they share; the lead runs on real time (its lease),
so the tests wait for it, bounded. Upstream calls are counted at the fake Freelancer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from app.coordination.popularity_sync import RedisPopularity
from app.coordination.redis_coordinator import RedisCoordinator
from app.domain import UserRecord
from app.gateway import Gateway
from tests.support.apps import redis_gateway, until
from tests.support.clock import FakeClock
from tests.support.freelancer import SlowUpstream
from tests.support.procs import RedisServer
from tests.support.redis_proxy import Proxy

pytestmark = pytest.mark.redis
TTL = 1000.0
LEAD_MOVES_S = 12.0
"""Bound on the lead moving to another process once the leader's link is cut (its lease
is 6 s, renewed every 2 s)."""

PRODUCTION_BUDGET: dict[str, Any] = {
    "upstream_rate_per_min": 50,
    "upstream_rate_per_hour": 1000,
    "upstream_burst": 10,
    "stale_if_error_s": 2 * LEAD_MOVES_S,  # REFRESH_PATIENCE_S: 12 s
}
"""Freelancer's budget, where a background refresh waits in the queue for its call to fill."""

Nodes = list[tuple[Gateway, Proxy]]
StartNodes = Callable[..., Awaitable[Nodes]]


@pytest.fixture
async def start_nodes(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[StartNodes]:
    started: Nodes = []

    async def start(
        clock: FakeClock, upstream: SlowUpstream, count: int = 2, **overrides: Any
    ) -> Nodes:
        for _ in range(count):
            proxy = Proxy(redis_server.port)
            await proxy.start()
            values: dict[str, Any] = {"cache_ttl_s": TTL, "refresh_ahead_min_hits": 3}
            gateway = redis_gateway(
                tmp_path,
                proxy.url,
                upstream=upstream,
                clock=clock,
                timeout_s=0.5,
                **(values | overrides),
            )
            await gateway.start()
            started.append((gateway, proxy))
        await until(lambda: sum(g.coordinator.leads() for g, _ in started) == 1, within_s=10)
        return list(started)

    yield start
    for _, proxy in started:
        proxy.restore()
    for gateway, proxy in started:
        await gateway.stop()
        await proxy.close()


def fetches_of(upstream: SlowUpstream, uid: int, since: int) -> int:
    """Upstream calls that carried `uid`, from call number `since` on."""
    return sum(uid in call for call in upstream.calls[since:])


async def due_and_popular(nodes: Nodes, clock: FakeClock, uid: int) -> tuple[Gateway, Gateway]:
    """`uid` asked for twice in each process (4 in the deployment: popular), fetched once,
    then its copy past REFRESH_AHEAD_AT of the TTL. Returns (leader, the other)."""
    leader = next(g for g, _ in nodes if g.coordinator.leads())
    other = next(g for g, _ in nodes if g is not leader)
    for gateway in (leader, other, leader, other):
        await gateway.lookup([uid])
        assert await gateway.wait_idle(5)
    clock.advance(TTL * 0.85)
    # The fetch's outcome stays claimable in Redis for 10 s of real time; 850 s of the
    # fake clock would have let it lapse.
    coordinator = leader.coordinator
    assert isinstance(coordinator, RedisCoordinator)
    await coordinator.redis.delete(coordinator.keys.done(uid))
    assert await other.refresh_ahead.tick() == 0  # shares its counts; does not lead
    return leader, other


def proxy_of(nodes: Nodes, gateway: Gateway) -> Proxy:
    return next(p for g, p in nodes if g is gateway)


async def test_a_refresh_queued_by_a_leader_that_lost_the_lead_is_not_fetched_beside_the_new_ones(
    start_nodes: StartNodes,
) -> None:
    """At the production budget (800 background calls an hour) a refresh-ahead waits in
    the leader's queue for its call to fill (REFRESH_PATIENCE_S, here 12 s). The leader's
    link to Redis is cut meanwhile: the lead moves, the new leader queues user 7 too. The
    old leader, which no longer leads, must not fetch 7 as well (before the fix it did, on
    its local budget, its claim unable to reach Redis: 7 was fetched twice)."""
    clock = FakeClock(time.time())  # SlowUpstream stamps users with time.time()
    upstream = SlowUpstream(delay_s=0.0)
    nodes = await start_nodes(clock, upstream, **PRODUCTION_BUDGET)
    leader, other = await due_and_popular(nodes, clock, 7)
    calls = len(upstream.calls)
    await leader.refresh_ahead.tick()
    assert 7 in leader.inflight and leader.inflight[7].ahead, "queued ahead, filling"
    assert fetches_of(upstream, 7, calls) == 0

    proxy_of(nodes, leader).cut()
    await until(lambda: other.coordinator.leads(), within_s=LEAD_MOVES_S)
    await until(lambda: not leader.coordinator.leads(), within_s=1)
    await other.refresh_ahead.tick()
    assert 7 in other.inflight, "the new leader refreshes the deployment's popular 7"

    for gateway in (leader, other):
        assert await gateway.wait_idle(3 * LEAD_MOVES_S)
    assert fetches_of(upstream, 7, calls) == 1, "7 refreshed ahead once in the deployment"


async def test_a_look_that_outlives_its_lead_does_not_refresh_what_the_new_leader_did(
    start_nodes: StartNodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader's look waits for the store's word on 7 (a slow read: its answer predates
    what follows). Its link to Redis is cut meanwhile; the lead moves, and the new leader
    refreshes 7 (one call). When the old leader's read answers, it no longer leads and
    has heard nothing of that refresh: it must not fetch 7 again (before the fix it did).
    Here the read spans the whole lease; in production a link cut up to 5 s before the
    look leaves the old leader leading through its merge, and a read of ~2 s is enough."""
    clock = FakeClock(time.time())
    upstream = SlowUpstream(delay_s=0.0)
    nodes = await start_nodes(clock, upstream, store_timeout_s=30)
    leader, other = await due_and_popular(nodes, clock, 7)
    calls = len(upstream.calls)

    store = leader.writes.store
    read = store.get_many
    held = asyncio.Event()
    release = asyncio.Event()

    async def slow_read(user_ids: Sequence[int]) -> dict[int, UserRecord]:
        found = await read(user_ids)  # the answer as of now, handed over later
        held.set()
        await release.wait()
        return found

    monkeypatch.setattr(store, "get_many", slow_read)
    look = asyncio.create_task(leader.refresh_ahead.tick())
    try:
        await until(held.is_set, within_s=5)
        proxy_of(nodes, leader).cut()
        await until(lambda: other.coordinator.leads(), within_s=LEAD_MOVES_S)
        await until(lambda: not leader.coordinator.leads(), within_s=1)
        await other.refresh_ahead.tick()
        assert await other.wait_idle(5)
        assert fetches_of(upstream, 7, calls) == 1, "the new leader refreshed 7"
    finally:
        release.set()
    await asyncio.wait_for(look, 10)
    assert await leader.wait_idle(5)
    assert fetches_of(upstream, 7, calls) == 1, "7 refreshed ahead once in the deployment"


async def test_a_leader_whose_clock_runs_ahead_still_merges_the_others_counts(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes share their counts of 7 (2 each: 4 in the deployment, popular at 3).
    The leader's clock runs 6 minutes ahead of the other's (an unsynchronised host). The
    merge must still count the other process, whose snapshot is live in Redis (before the
    fix the leader pruned the list of processes by its own clock, dropped the other and
    saw 7 at 2: not popular, never refreshed ahead)."""
    skew = {"s": 0.0}
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + skew["s"])  # this process's clock
    client = Redis.from_url(redis_server.url)
    try:
        behind = RedisPopularity(
            client, prefix="t", process="behind", timeout_s=1.0, leads=lambda: False
        )
        ahead = RedisPopularity(
            client, prefix="t", process="ahead", timeout_s=1.0, leads=lambda: True
        )
        assert await behind.merge({7: 2}, min_hits=3) == {}
        skew["s"] = 360.0
        assert await ahead.merge({7: 2}, min_hits=3) == {7: 4}
        skew["s"] = 0.0
        await behind.merge({7: 2}, min_hits=3)  # the next looks: still merged
        skew["s"] = 360.0
        assert await ahead.merge({7: 2}, min_hits=3) == {7: 4}
    finally:
        await client.aclose()


async def test_a_sweep_refresh_queued_by_a_leader_that_lost_the_lead_is_not_fetched(
    start_nodes: StartNodes,
) -> None:
    """The refresh sweep (REFRESH_INTERVAL_S) is the leader's duty too, in the same lane:
    user 7, about to turn stale, waits in the leader's queue for its call to fill. The
    leader's link to Redis is cut, the lead moves, and the new leader's sweep queues 7.
    The old leader must not fetch 7 as well (before the fix it did: two calls)."""
    clock = FakeClock(time.time())
    upstream = SlowUpstream(delay_s=0.0)
    nodes = await start_nodes(
        clock, upstream, **PRODUCTION_BUDGET, refresh_interval_s=TTL / 10, refresh_ahead=False
    )
    leader = next(g for g, _ in nodes if g.coordinator.leads())
    other = next(g for g, _ in nodes if g is not leader)
    await leader.lookup([7])
    assert await leader.wait_idle(5)
    clock.advance(TTL * 0.95)  # within a sweep interval of turning stale
    coordinator = leader.coordinator  # the fetch's outcome, claimable for 10 s: lapsed
    assert isinstance(coordinator, RedisCoordinator)
    await coordinator.redis.delete(coordinator.keys.done(7))
    calls = len(upstream.calls)
    assert await leader.admin.sweep_once() == 1
    assert fetches_of(upstream, 7, calls) == 0, "queued, filling"

    proxy_of(nodes, leader).cut()
    await until(lambda: other.coordinator.leads(), within_s=LEAD_MOVES_S)
    await until(lambda: not leader.coordinator.leads(), within_s=1)
    assert await other.admin.sweep_once() == 1, "the new leader sweeps 7"
    for gateway in (leader, other):
        assert await gateway.wait_idle(3 * LEAD_MOVES_S)
    assert fetches_of(upstream, 7, calls) == 1, "7 refreshed once in the deployment"
