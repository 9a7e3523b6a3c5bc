"""The ways cross-process single flight breaks, each against a real redis-server.

Gateways run in this process, each with its own Redis connections: to Redis they are
separate processes.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from app.coordination.client import connect
from app.coordination.redis_coordinator import RedisCoordinator
from app.domain import UserRecord
from app.gateway import Gateway
from app.gateway.cache import cache_entry
from app.gateway.coordinator import Event, Fetched
from tests.gateway.conftest import StartGateway
from tests.support.apps import until
from tests.support.freelancer import SlowUpstream
from tests.support.procs import RedisServer


def coordinator_of(gateway: Gateway) -> RedisCoordinator:
    assert isinstance(gateway.coordinator, RedisCoordinator)
    return gateway.coordinator


async def test_a_cached_hit_never_touches_redis_and_a_batch_costs_three_round_trips(
    start_gateway: StartGateway,
) -> None:
    gateway = await start_gateway(SlowUpstream(delay_s=0))
    coordinator = coordinator_of(gateway)
    await gateway.lookup(list(range(1, 51)))
    assert await gateway.wait_idle(5)
    assert coordinator.round_trips == 3, "claim; announce (done keys, leases); publish"
    for _ in range(100):
        await gateway.lookup(list(range(1, 51)))
    assert coordinator.round_trips == 3


async def test_one_channel_for_the_whole_deployment(
    start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    await start_gateway(SlowUpstream())
    await start_gateway(SlowUpstream())
    client = Redis.from_url(redis_server.url)
    try:
        channels = await client.pubsub_channels()
        assert channels == [b"t:events"], "no subscription per id"
        assert (await client.pubsub_numsub("t:events")) == [(b"t:events", 2)]
    finally:
        await client.aclose()


async def test_a_waiter_is_answered_after_its_subscription_was_killed(
    start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    upstream = SlowUpstream(delay_s=0.5)
    owner = await start_gateway(upstream)
    waiter = await start_gateway(upstream)
    await waiter.lookup([1])  # in the waiter's memory
    first = asyncio.create_task(owner.lookup([2]))
    await asyncio.sleep(0.1)  # the owner holds 2
    waiting = asyncio.create_task(waiter.lookup([2]))
    await asyncio.sleep(0.1)  # the waiter waits on the owner's announcement
    client = Redis.from_url(redis_server.url)
    try:
        killed = await client.client_kill_filter(_type="pubsub")
    finally:
        await client.aclose()
    assert killed >= 2
    result = await asyncio.wait_for(waiting, 5)
    assert result.user_ids == [2]
    assert (await first).user_ids == [2]
    assert [uid for call in upstream.calls for uid in call].count(2) == 1
    # What was announced during the gap is lost: memory was dropped, the store has it all.
    await until(lambda: 1 not in waiter.memory.users)
    assert (await waiter.lookup([1])).user_ids == [1]


async def test_a_late_owner_does_not_overwrite_a_newer_outcome(
    start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    late = coordinator_of(await start_gateway(SlowUpstream()))
    other = coordinator_of(await start_gateway(SlowUpstream()))
    older = UserRecord(9, "older", created_at=1.0, fetched_at=100.0)
    newer = UserRecord(9, "newer", created_at=1.0, fetched_at=200.0)
    assert await late.claim([9]) == [9]
    client = Redis.from_url(redis_server.url)
    try:
        await client.delete("t:{9}:lease")  # the late owner paused past its lease
    finally:
        await client.aclose()
    assert await other.claim([9]) == [9]
    await other.announce({9: cache_entry(newer)})
    await late.announce({9: cache_entry(older)})  # wakes up and announces what it had
    seen: list[Event] = []
    third = RedisCoordinator(connect(redis_server.url, 1.0), prefix="t", lease_s=2, timeout_s=1)
    await third.open(seen.append)
    try:
        assert await third.claim([9]) == []
        assert seen == [Fetched({9: cache_entry(newer)})]
    finally:
        await third.close()


async def test_deployments_with_other_prefixes_do_not_meet(start_gateway: StartGateway) -> None:
    upstream = SlowUpstream(delay_s=0)
    a = await start_gateway(upstream, prefix="one")
    b = await start_gateway(upstream, prefix="two")
    await asyncio.gather(a.lookup([4]), b.lookup([4]))
    assert [uid for call in upstream.calls for uid in call] == [4, 4]


async def test_only_one_process_leads_the_sweep(start_gateway: StartGateway) -> None:
    gateways = [await start_gateway(SlowUpstream()) for _ in range(3)]
    await until(lambda: sum(g.coordinator.leads() for g in gateways) == 1)
    await until(lambda: all(g.coordinator.live_processes == 3 for g in gateways), within_s=6)
