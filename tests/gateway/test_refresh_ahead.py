"""Refresh-ahead: popular users are refreshed with spare budget before they turn stale.

Time is a `FakeClock` the tests step; each test runs the refresh-ahead loop's look
(`RefreshAhead.tick`) itself after each step, so nothing waits on the loop's timer.
"""

from __future__ import annotations

from typing import Any

from app.gateway.batching import PRIORITY_JOB, PRIORITY_SWEEP
from tests.support.apps import Running, StartApp
from tests.support.clock import FakeClock
from tests.support.freelancer import FakeFreelancer

TTL = 1000.0


async def start(start_app: StartApp, clock: FakeClock, **overrides: Any) -> Running:
    values: dict[str, Any] = {"cache_ttl_s": TTL, "refresh_ahead_min_hits": 3}
    return await start_app(clock=clock, **(values | overrides))


async def tick(running: Running) -> int:
    """One look of the refresh-ahead loop, then wait until what it queued is fetched."""
    queued = await running.gateway.refresh_ahead.tick()
    assert await running.gateway.wait_idle(5)
    return queued


async def ask_over_ttls(running: Running, clock: FakeClock, uid: int, ttls: int) -> list[str]:
    """Ask for `uid` every tenth of a TTL for `ttls` TTLs, the loop looking each time; the
    sources answered."""
    sources = []
    for _ in range(ttls * 10):
        body = await running.lookup(uid)
        sources.append(body["users"][0]["source"])
        await tick(running)
        clock.advance(TTL / 10)
    return sources


async def test_a_popular_user_is_never_served_stale_nor_fetched_while_a_client_waits(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    clock = FakeClock()
    running = await start(start_app, clock)
    sources = await ask_over_ttls(running, clock, 7, ttls=3)
    assert sources[0] == "fetched"
    assert set(sources[1:]) == {"cache"}, "never stale, never a miss after the first"
    stats = running.gateway.stats
    assert stats.stale_popular == stats.stale_other == 0
    # Refreshed ahead about once a TTL, each time in a call of its own (no client in it).
    assert stats.refresh_ahead_ids == stats.refresh_ahead_calls == len(freelancer.calls) - 1
    assert 2 <= stats.refresh_ahead_ids <= 4


async def test_with_refresh_ahead_off_the_same_user_is_served_stale(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    clock = FakeClock()
    running = await start(start_app, clock, refresh_ahead=False)
    sources = await ask_over_ttls(running, clock, 7, ttls=3)
    assert "stale" in sources
    assert running.gateway.stats.refresh_ahead_calls == 0
    assert running.gateway.stats.stale_other >= 1


async def test_refresh_ahead_queues_in_the_lowest_lane(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    clock = FakeClock()
    running = await start(start_app, clock)
    for _ in range(3):
        await running.lookup(8)
    clock.advance(TTL * 0.85)
    gateway = running.gateway
    queue = gateway.queue
    lanes: list[int] = []
    put = queue.put_nowait

    def recording_put(uid: int, priority: int) -> None:
        lanes.append(priority)
        put(uid, priority)

    queue.put_nowait = recording_put  # type: ignore[method-assign,assignment]
    assert await tick(running) == 1
    assert lanes == [PRIORITY_SWEEP]
    assert freelancer.lookups[8] == 2


async def test_a_user_asked_for_too_rarely_is_not_refreshed_ahead(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    clock = FakeClock()
    running = await start(start_app, clock)
    await running.lookup(9)
    await running.lookup(9)
    clock.advance(TTL * 0.85)
    assert await tick(running) == 0
    assert freelancer.lookups[9] == 1
    assert running.gateway.refresh_ahead.coverage.popular == 0


async def test_when_the_budget_is_short_the_most_popular_go_first(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    clock = FakeClock()
    # A batch of 2 and one batch at a time for refresh-ahead: 2 ids a look.
    running = await start(start_app, clock, batch_size=2, upstream_concurrency=2)
    asked = {11: 9, 12: 3, 13: 7, 14: 5, 15: 4}
    for uid, times in asked.items():
        for _ in range(times):
            await running.lookup(uid)
    clock.advance(TTL * 0.85)
    calls_before = len(freelancer.calls)
    assert await tick(running) == 2
    assert sorted(freelancer.calls[calls_before]) == [11, 13], "the two most asked first"
    assert await tick(running) == 2
    assert sorted(freelancer.calls[calls_before + 1]) == [14, 15]
    coverage = running.gateway.refresh_ahead.coverage
    assert (coverage.popular, coverage.covered) == (5, 5)


async def test_refresh_ahead_spends_nothing_while_a_miss_or_a_job_waits(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    clock = FakeClock()
    running = await start(start_app, clock)
    gateway = running.gateway
    planner = gateway.planner
    assert planner.spare_calls() > 0
    # Ids queued in the miss and job lanes (put straight in the queue: the worker is
    # not woken between these lines, no await).
    gateway.queue.put_nowait(99_001, PRIORITY_JOB)
    assert planner.spare_calls() == 0, "a job's ids wait: refresh-ahead spends nothing"
    gateway.queue.clear()


async def test_refresh_ahead_keeps_the_clients_reserve(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    clock = FakeClock()
    # 4 calls a minute, 2 of them reserved for clients.
    running = await start(
        start_app, clock, upstream_rate_per_min=4, upstream_reserve_per_min=2, batch_size=1
    )
    for uid in (21, 22):  # two calls: the background lanes' part of the minute is spent
        for _ in range(3):
            await running.lookup(uid)
    clock.advance(TTL * 0.85)
    assert running.gateway.planner.spare_calls() == 0
    assert await tick(running) == 0, "nothing queued: the rest of the minute is the clients'"
    assert len(freelancer.calls) == 2
    body = await running.lookup(23)  # a client's miss still has its reserve
    assert body["users"][0]["source"] == "fetched"
    assert len(freelancer.calls) == 3


async def test_stats_metrics_and_health_show_refresh_ahead(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    clock = FakeClock()
    running = await start(start_app, clock)
    await ask_over_ttls(running, clock, 31, ttls=2)
    await running.lookup(32)  # asked once: not popular, so served stale after a TTL
    clock.advance(TTL + 1)
    await running.gateway.refresh_ahead.tick()
    assert (await running.lookup(32))["users"][0]["source"] == "stale"
    assert await running.gateway.wait_idle(5)
    # That look found 31 stale (the clock jumped a whole TTL) and queued it; the next one
    # sees it fresh again: covered.
    await running.gateway.refresh_ahead.tick()
    stats = (await running.client.get("/api/stats")).json()
    assert stats["refresh_ahead_calls"] >= 1
    assert stats["refresh_ahead_ids"] == stats["refresh_ahead_calls"]
    assert (stats["stale_popular"], stats["stale_other"]) == (0, 1)
    metrics = (await running.client.get("/metrics")).text
    assert f"gateway_refresh_ahead_ids_total {float(stats['refresh_ahead_ids'])}" in metrics
    assert "gateway_stale_other_total 1.0" in metrics
    assert "gateway_popular_users 1.0" in metrics
    health = (await running.client.get("/")).json()
    assert health["refresh_ahead"] == {
        "enabled": True,
        "popular": 1,
        "covered": 1,
        "coverage": 1.0,
    }
