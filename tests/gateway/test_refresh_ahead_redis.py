"""Refresh-ahead across processes, against a real redis-server: every process's counts are
merged, and only the leader refreshes, each popular id once.

Gateways run in this process, each with its own Redis connections: to Redis they are
separate processes. Time is a `FakeClock` they share; each test runs the loops' looks.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from app.coordination.redis_coordinator import RedisCoordinator
from app.gateway import Gateway
from tests.support.apps import redis_gateway, until
from tests.support.clock import FakeClock
from tests.support.freelancer import SlowUpstream
from tests.support.procs import RedisServer

pytestmark = pytest.mark.redis
TTL = 1000.0


async def test_counts_of_two_processes_are_merged_and_only_the_leader_refreshes(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    clock = FakeClock(time.time())  # SlowUpstream stamps users with time.time()
    upstream = SlowUpstream(delay_s=0.0)
    gateways: list[Gateway] = []
    for _ in range(2):
        gateway = redis_gateway(
            tmp_path,
            redis_server.url,
            upstream=upstream,
            clock=clock,
            cache_ttl_s=TTL,
            refresh_ahead_min_hits=3,
        )
        await gateway.start()
        gateways.append(gateway)
    try:
        await until(lambda: sum(g.coordinator.leads() for g in gateways) == 1, within_s=10)
        a, b = gateways
        await a.lookup([5, 6])  # both fetched once, by a
        await b.lookup([5, 6])  # b answers from the store
        await a.lookup([5])
        await b.lookup([6])  # 5 and 6 each asked twice here and there: 2 + 2 in all
        calls = len(upstream.calls)
        clock.advance(TTL * 0.85)
        # The fetches' outcomes stay claimable in Redis for 10 s of real time; 850 s of
        # the fake clock would have let them lapse.
        coordinator = b.coordinator
        assert isinstance(coordinator, RedisCoordinator)
        keys = coordinator.keys
        await coordinator.redis.delete(keys.done(5), keys.done(6))
        for gateway in (a, b, a, b):  # each shares its counts; the leader merges and queues
            await gateway.refresh_ahead.tick()
        for gateway in gateways:
            assert await gateway.wait_idle(5)
        refreshed = [uid for call in upstream.calls[calls:] for uid in call]
        assert sorted(refreshed) == [5, 6], "merged counts reach 4 (each process had 2)"
        assert sorted(refreshed) == sorted(set(refreshed)), "each id once"
        leaders = [g for g in gateways if g.coordinator.leads()]
        assert len(leaders) == 1
        leader = leaders[0]
        assert next(g for g in gateways if g is not leader).refresh_ahead.coverage.popular == 0
        assert leader.refresh_ahead.coverage.popular == 2
    finally:
        for gateway in gateways:
            await gateway.stop()
        await asyncio.sleep(0)
