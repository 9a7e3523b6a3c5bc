"""Red team of refresh-ahead (issue 19): a long tail of distinct ids, coverage while the
budget is short, a single upstream slot.

Time is a `FakeClock` the tests step (the users' freshness); the windows run on the loop's
clock, so calls spent in a test stay in the minute for the rest of it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.domain import UserRecord
from app.errors import StoreUnavailable
from app.gateway.cache import cache_entry
from app.gateway.popularity import Popularity
from tests.support.apps import Running, StartApp, until
from tests.support.clock import FakeClock
from tests.support.freelancer import FakeFreelancer

TTL = 1000.0


async def start(start_app: StartApp, clock: FakeClock, **overrides: Any) -> Running:
    values: dict[str, Any] = {"cache_ttl_s": TTL, "refresh_ahead_min_hits": 3}
    return await start_app(clock=clock, **(values | overrides))


# ---- a long tail of distinct ids ------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    folds=st.lists(
        st.tuples(st.integers(2, 8), st.integers(0, 40)),  # (hot lookups, tail ids) per fold
        min_size=1,
        max_size=12,
    ),
    max_ids=st.integers(2, 10),
)
def test_a_long_tail_never_erodes_the_most_asked_ids_counts(
    folds: list[tuple[int, int]], max_ids: int
) -> None:
    """Reference: within one decay period, an id asked more than any other is always kept
    with its exact count, however many distinct ids come (the bound only drops the least
    asked). Before the fix, every fold that overflowed `max_ids` halved every count: a
    stream of distinct ids halved the popular set away within seconds."""
    mono = [0.0]  # a fold a second: a rate far below sampling's, every lookup counted
    popularity = Popularity(
        min_hits=3, max_ids=max_ids, decay_s=1e9, now=0.0, clock=lambda: mono[0]
    )
    hot = 1
    reference: Counter[int] = Counter()
    tail = iter(range(1000, 10**6))
    for hot_lookups, tail_ids in folds:
        for _ in range(hot_lookups):
            popularity.saw([hot])
            reference[hot] += 1
        for _ in range(tail_ids):  # each tail id once: the hot id stays the most asked
            popularity.saw([next(tail)])
        mono[0] += 1.0
        popularity.fold(now=mono[0])
        assert popularity.every == 1
        assert len(popularity.counts) <= max_ids, "memory stays bounded"
        assert popularity.estimate(hot) == reference[hot]
        assert hot in popularity.rank() or reference[hot] < 3


@given(
    counts=st.dictionaries(st.integers(1, 200), st.integers(1, 6), max_size=60),
    max_ids=st.integers(1, 30),
)
def test_the_bound_drops_the_least_asked_whole_and_keeps_the_rest_exact(
    counts: dict[int, int], max_ids: int
) -> None:
    """Reference: the kept ids are those above the lowest count level that brings them
    within `max_ids`; their counts untouched; keeping the next level down would not fit."""
    popularity = Popularity(min_hits=3, max_ids=max_ids, decay_s=1e9, now=0.0)
    popularity.counts = Counter(counts)
    popularity.trim()
    kept = dict(popularity.counts)
    assert len(kept) <= max_ids
    assert all(counts[u] == c for u, c in kept.items()), "exact counts"
    dropped = {u: c for u, c in counts.items() if u not in kept}
    assert not dropped or not kept or max(dropped.values()) < min(kept.values())
    if dropped and len(counts) > max_ids:
        top_dropped = max(dropped.values())
        assert len(kept) + sum(c == top_dropped for c in dropped.values()) > max_ids


async def test_a_popular_user_stays_fresh_through_a_flood_of_distinct_ids(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """A client asks for user 7 every tenth of a TTL; another pages through 6 000 distinct
    stored users (more than the counts keep) between two looks. User 7 must stay popular,
    so refreshed ahead and never served stale."""
    clock = FakeClock()
    running = await start(start_app, clock, memory_cache_size=1000)
    gateway = running.gateway
    # Stored as fetched at the end of the test's time: they stay fresh, cost no call.
    end = clock() + 4 * TTL
    tail = [UserRecord(uid, f"u{uid}", fetched_at=end) for uid in range(100_000, 106_000)]
    await gateway.store.upsert_many(tail)
    sources = []
    for _ in range(30):  # 3 TTLs
        sources.append((await running.lookup(7))["users"][0]["source"])
        for first in range(100_000, 106_000, 100):
            await gateway.lookup(range(first, first + 100))
        await gateway.refresh_ahead.tick()
        assert await gateway.wait_idle(5)
        clock.advance(TTL / 10)
    assert {uid for call in freelancer.calls for uid in call} == {7}, "the tail cost no call"
    assert len(gateway.refresh_ahead.popularity.counts) <= 6100, "bounded (max_ids + a fold)"
    assert "stale" not in sources and sources.count("fetched") == 1, sources
    assert gateway.stats.stale_popular == 0


# ---- coverage while the budget is short -----------------------------------------------


async def test_coverage_does_not_count_a_user_served_stale_as_covered(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """Two popular users are stale while the minute is spent. Each stale read queues a
    refresh that cannot go yet: both are served stale, so neither is covered (before the
    fix a refresh in flight counted, and coverage said 100 % while both were served stale)."""
    clock = FakeClock()
    running = await start(
        start_app, clock, upstream_rate_per_min=3, upstream_reserve_per_min=1, batch_size=1
    )
    gateway = running.gateway
    for uid in (21, 22, 23):
        assert (await running.lookup(uid))["users"][0]["source"] == "fetched"
    assert len(freelancer.calls) == 3, "the minute is spent: no call until it rolls"
    clock.advance(TTL + 1)
    await gateway.refresh_ahead.tick()
    for uid in (21, 22):  # asked 3 times each: popular, and served stale
        for _ in range(3):
            assert (await running.lookup(uid))["users"][0]["source"] == "stale"
    assert {21, 22} <= gateway.inflight.keys(), "their refreshes wait for the minute"
    await gateway.refresh_ahead.tick()
    coverage = gateway.refresh_ahead.coverage
    assert (coverage.popular, coverage.covered, coverage.ratio) == (2, 0, 0.0)
    health = (await running.client.get("/")).json()
    assert health["refresh_ahead"]["coverage"] == 0.0
    assert len(freelancer.calls) == 3


# ---- a single upstream slot -----------------------------------------------------------


async def test_with_one_upstream_slot_refresh_ahead_never_holds_a_miss_behind_it(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """UPSTREAM_CONCURRENCY=1: a refresh-ahead call in flight would hold the only slot, and
    a client's miss arriving then would wait for Freelancer's answer to it. Refresh-ahead
    must leave the slot to clients (before the fix it took it: `max(1, 1 - 1)` batches)."""
    clock = FakeClock()
    running = await start(start_app, clock, upstream_concurrency=1)
    await popular_and_due(running, clock)
    gate = freelancer.gate = asyncio.Event()  # Freelancer holds every answer from here on
    await refresh_ahead_then_a_miss(running, freelancer, gate)
    assert freelancer.calls[1] == [8], "the miss went first"


async def test_refresh_ahead_leaves_a_slot_free_while_a_job_holds_the_others(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """UPSTREAM_CONCURRENCY=2 and a job's batch in a call: its ids are not queued, so the
    planner says spare budget, but only one slot is left. Refresh-ahead must not take it
    (before the fix it counted only its own batches, took it, and the miss waited for
    Freelancer's answer to the job)."""
    clock = FakeClock()
    running = await start(start_app, clock, upstream_concurrency=2)
    gateway = running.gateway
    await popular_and_due(running, clock)
    gate = freelancer.gate = asyncio.Event()
    gateway.enlist([500], {})  # a crawl job's id: its call reaches Freelancer and waits
    await until(lambda: [500] in freelancer.calls)
    await refresh_ahead_then_a_miss(running, freelancer, gate)
    assert freelancer.calls[2] == [8], "the miss took the free slot"
    assert await gateway.wait_idle(5)


async def popular_and_due(running: Running, clock: FakeClock) -> None:
    """User 7 asked for 3 times (popular), then its copy past REFRESH_AHEAD_AT of the TTL."""
    for _ in range(3):
        await running.lookup(7)
    clock.advance(TTL * 0.85)


async def refresh_ahead_then_a_miss(
    running: Running, freelancer: FakeFreelancer, gate: asyncio.Event
) -> None:
    """Refresh-ahead looks while Freelancer holds its answers (`gate`); then a
    client's miss (id 8) must reach Freelancer and be answered by its own fetch."""
    await running.gateway.refresh_ahead.tick()
    await asyncio.sleep(0.05)  # a refresh-ahead call, if queued, reaches Freelancer
    miss = asyncio.create_task(running.lookup(8))
    try:
        await until(lambda: 8 in freelancer.lookups, within_s=2)
    finally:
        gate.set()
        body = await miss
    assert body["users"][0]["source"] == "fetched"


# ---- a leader that missed another process's refresh -----------------------------------


async def test_a_leader_that_missed_a_refresh_elsewhere_does_not_fetch_it_again(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """User 7 is popular and due in this process's memory, but another process (the leader
    before this one) refreshed it and saved the copy; its announcement never arrived here
    (lost while the link was down). The leader must see the store's newer copy and spend
    no call on it (before the fix it judged by memory alone and fetched 7 again), and it
    then serves that copy."""
    clock = FakeClock()
    running = await start(start_app, clock)
    gateway = running.gateway
    await popular_and_due(running, clock)
    calls = len(freelancer.calls)
    newer = UserRecord(7, "renamed7", "Renamed", created_at=clock() - TTL, fetched_at=clock())
    await gateway.writes.store.upsert_many([newer])  # the other process's save
    assert await gateway.refresh_ahead.tick() == 0
    await asyncio.sleep(0.05)  # a refresh, if queued, reaches Freelancer
    assert len(freelancer.calls) == calls, "no call for a copy refreshed elsewhere"
    assert gateway.refresh_ahead.coverage.covered == 1
    clock.advance(TTL * 0.5)  # past the old copy's TTL, well within the new one's
    user = (await running.lookup(7))["users"][0]
    assert (user["username"], user["source"]) == ("renamed7", "cache")
    assert len(freelancer.calls) == calls


async def test_with_the_store_down_memory_alone_decides_what_is_refreshed_ahead(
    start_app: StartApp, freelancer: FakeFreelancer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store cannot say whether 7 was refreshed elsewhere: memory still serves it, so
    it is refreshed ahead on memory's word rather than left to turn stale."""
    clock = FakeClock()
    running = await start(start_app, clock)
    gateway = running.gateway
    await popular_and_due(running, clock)

    async def down(user_ids: Sequence[int]) -> dict[int, UserRecord]:
        raise StoreUnavailable("the store is down (test)")

    monkeypatch.setattr(gateway.writes.store, "get_many", down)
    assert await gateway.refresh_ahead.tick() == 1
    await until(lambda: [7] in freelancer.calls)


async def test_a_user_fetched_while_the_store_answers_is_not_refreshed_again(
    start_app: StartApp, freelancer: FakeFreelancer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While refresh-ahead waits for the store's word on 7, a client's fetch of 7 lands in
    memory: refresh-ahead must see that copy and spend no call on it."""
    clock = FakeClock()
    running = await start(start_app, clock)
    gateway = running.gateway
    await popular_and_due(running, clock)
    calls = len(freelancer.calls)
    read = gateway.writes.store.get_many

    async def read_while_7_is_fetched(user_ids: Sequence[int]) -> dict[int, UserRecord]:
        stored = await read(user_ids)
        fresh = UserRecord(7, "fetched7", "Fetched", created_at=clock() - TTL, fetched_at=clock())
        gateway.memory.learn(7, cache_entry(fresh), clock())  # as a client's fetch would
        return stored

    monkeypatch.setattr(gateway.writes.store, "get_many", read_while_7_is_fetched)
    assert await gateway.refresh_ahead.tick() == 0
    await asyncio.sleep(0.05)
    assert len(freelancer.calls) == calls
