"""Red team of refresh-ahead's store check (`_not_refreshed_elsewhere`): the tick's other
awaits, a store that fails or hangs, and what coverage says after the store answered.

Time is a `FakeClock` the tests step (the users' freshness); a test that needs time to
pass while the store answers steps it inside the store's read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from app.domain import UserRecord
from app.errors import StoreUnavailable
from tests.support.apps import Running, StartApp, until
from tests.support.clock import FakeClock
from tests.support.freelancer import FakeFreelancer

TTL = 1000.0


async def start(start_app: StartApp, clock: FakeClock, **overrides: Any) -> Running:
    values: dict[str, Any] = {"cache_ttl_s": TTL, "refresh_ahead_min_hits": 3}
    return await start_app(clock=clock, **(values | overrides))


async def popular(running: Running, uid: int, asks: int = 3) -> None:
    """`uid` asked for `asks` times (3: popular), and its copy saved."""
    for _ in range(asks):
        await running.lookup(uid)
    assert await running.gateway.wait_idle(5)


async def client_refreshes_7_while_stale(running: Running) -> None:
    """A client asks for 7 while its copy is stale: served stale, its refresh is fetched
    (one call) and lands in memory."""
    gateway = running.gateway
    assert (await running.lookup(7))["users"][0]["source"] == "stale"
    await until(lambda: 7 not in gateway.inflight)


async def test_a_user_only_stored_and_fetched_by_a_client_during_the_read_is_not_refetched(
    start_app: StartApp, freelancer: FakeFreelancer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """User 7 is popular, but pushed out of memory: refresh-ahead judges it by its stored
    copy, read in `_copies`. While that read is under way, a client's stale read of 7
    refreshes it (one call) and the fresh copy lands in memory. Refresh-ahead must see it
    and spend no second call (before the fix only ids judged by memory were looked at
    again, and 7 was fetched twice); coverage counts it as covered."""
    clock = FakeClock()
    running = await start(start_app, clock)
    gateway = running.gateway
    await popular(running, 7, asks=8)  # still popular after the TTL's decay halves it
    gateway.memory.users.pop(7)  # as a full memory's LRU drops it; the store keeps it
    clock.advance(TTL * 1.05)  # stale: a client's read refreshes it
    read = gateway.writes.store.get_many

    async def read_while_a_client_refreshes_7(ids: Sequence[int]) -> dict[int, UserRecord]:
        stored = await read(ids)
        if 7 in ids:
            await client_refreshes_7_while_stale(running)
        return stored

    monkeypatch.setattr(gateway.writes.store, "get_many", read_while_a_client_refreshes_7)
    calls = len(freelancer.calls)
    queued = await gateway.refresh_ahead.tick()
    assert await gateway.wait_idle(5)
    assert freelancer.calls[calls:] == [[7]], "the client's refresh only"
    assert queued == 0
    coverage = gateway.refresh_ahead.coverage
    assert (coverage.popular, coverage.covered) == (1, 1)


async def test_with_the_store_failing_a_fetch_that_landed_during_the_read_is_not_refetched(
    start_app: StartApp, freelancer: FakeFreelancer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """7 is due in memory; the store read that would confirm it hangs and fails, and while
    it hangs 7 turns stale and a client's read refreshes it. Falling back to memory's word,
    refresh-ahead must take memory's word as it is now, not as it was before the read
    (before the fix it queued 7 again: a second call for a copy a moment old)."""
    clock = FakeClock()
    running = await start(start_app, clock)
    gateway = running.gateway
    await popular(running, 7)
    clock.advance(TTL * 0.85)

    async def hang_while_a_client_refreshes_7(ids: Sequence[int]) -> dict[int, UserRecord]:
        clock.advance(TTL * 0.2)  # the store hangs; 7 turns stale meanwhile
        await client_refreshes_7_while_stale(running)
        raise StoreUnavailable("the store timed out (test)")

    monkeypatch.setattr(gateway.writes.store, "get_many", hang_while_a_client_refreshes_7)
    calls = len(freelancer.calls)
    queued = await gateway.refresh_ahead.tick()
    assert await gateway.wait_idle(5)
    assert freelancer.calls[calls:] == [[7]], "the client's refresh only"
    assert queued == 0


async def test_with_the_store_down_a_popular_id_absent_from_memory_stops_no_refresh(
    start_app: StartApp, freelancer: FakeFreelancer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients keep asking for 9, a user Freelancer does not have (answered from the
    not-found cache, so never in memory's users), and for 7, due in memory. With the store
    down, refresh-ahead must still refresh 7 on memory's word (before the fix the read of
    9's stored copy failed the whole look, every look, and 7 was left to turn stale)."""
    clock = FakeClock()
    running = await start(start_app, clock)
    gateway = running.gateway
    freelancer.missing.add(9)
    await popular(running, 9)
    await popular(running, 7)
    clock.advance(TTL * 0.85)

    async def down(ids: Sequence[int]) -> dict[int, UserRecord]:
        raise StoreUnavailable("the store is down (test)")

    monkeypatch.setattr(gateway.writes.store, "get_many", down)
    calls = len(freelancer.calls)
    assert await gateway.refresh_ahead.tick() == 1
    await until(lambda: freelancer.calls[calls:] == [[7]])
    assert await gateway.wait_idle(5)
    coverage = gateway.refresh_ahead.coverage
    assert (coverage.popular, coverage.covered) == (1, 1), "7, from memory; 9 has no copy"


async def test_a_hanging_store_holds_a_look_up_no_longer_than_one_store_timeout(
    start_app: StartApp, freelancer: FakeFreelancer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every store read hangs until STORE_TIMEOUT_S. A look reads the store for ids absent
    from memory (9) and for those memory says are due (7): once the first read timed out
    the store is down for this look, so the second must not wait another timeout before 7
    is queued on memory's word (before the fix the look failed after one timeout; with
    only the first part fixed it waited two)."""
    timeout_s = 0.5
    clock = FakeClock()
    running = await start(start_app, clock, store_timeout_s=timeout_s)
    gateway = running.gateway
    freelancer.missing.add(9)
    await popular(running, 9)
    await popular(running, 7)
    clock.advance(TTL * 0.85)
    reads = 0

    async def hang(ids: Sequence[int]) -> dict[int, UserRecord]:
        nonlocal reads
        reads += 1
        await asyncio.sleep(timeout_s)  # as the store's own guard: its timeout, then a failure
        raise StoreUnavailable(f"the store did not answer within {timeout_s} s (test)")

    monkeypatch.setattr(gateway.writes.store, "get_many", hang)
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await gateway.refresh_ahead.tick() == 1
    took = loop.time() - began
    assert reads == 1, "one timed-out read per look"
    assert took < 1.8 * timeout_s, took
    assert await gateway.wait_idle(5)


async def test_coverage_does_not_count_a_copy_that_turned_stale_while_the_store_answered(
    start_app: StartApp, freelancer: FakeFreelancer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """7 is due; the store's read of it takes long enough for 7 to pass its TTL (a short
    CACHE_TTL_S beside STORE_TIMEOUT_S). Its readers now get it stale and its refresh is
    only queued, so coverage must not count it (before the fix coverage judged freshness
    by the time before the read and said 100 %)."""
    clock = FakeClock()
    running = await start(start_app, clock)
    gateway = running.gateway
    await popular(running, 7)
    clock.advance(TTL * 0.85)
    freelancer.gate = asyncio.Event()  # the refresh stays in flight while coverage is read
    read = gateway.writes.store.get_many

    async def slow(ids: Sequence[int]) -> dict[int, UserRecord]:
        stored = await read(ids)
        clock.advance(TTL * 0.16)
        return stored

    monkeypatch.setattr(gateway.writes.store, "get_many", slow)
    assert await gateway.refresh_ahead.tick() == 1
    coverage = gateway.refresh_ahead.coverage
    assert (coverage.popular, coverage.covered) == (1, 0)
    freelancer.gate.set()
    assert await gateway.wait_idle(5)


async def test_a_user_pushed_out_of_memory_during_the_read_keeps_its_created_at(
    start_app: StartApp, freelancer: FakeFreelancer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """7 is due in memory; while the store confirms it, clients' new users push 7 out of a
    full memory. The refresh still goes (7 is popular, its copy due), but it must keep
    7's `created_at` (the stored copy has it): before the fix it was refreshed with no
    previous copy, and clients were then answered a `created_at` of the refresh's time
    (the store kept the first: the two disagreed)."""
    clock = FakeClock()
    running = await start(start_app, clock, memory_cache_size=1000, key_misses_per_min=2000)
    gateway = running.gateway
    await popular(running, 7)
    created = (await running.lookup(7))["users"][0]["created_at"]
    clock.advance(TTL * 0.85)
    read = gateway.writes.store.get_many

    async def read_while_7_is_pushed_out(ids: Sequence[int]) -> dict[int, UserRecord]:
        stored = await read(ids)
        if ids == [7]:
            for first in range(1000, 2100, 100):  # new users, fetched: each held; 7 drops
                await running.lookup(*range(first, first + 100))
            assert 7 not in gateway.memory.users
        return stored

    monkeypatch.setattr(gateway.writes.store, "get_many", read_while_7_is_pushed_out)
    assert await gateway.refresh_ahead.tick() == 1
    assert await gateway.wait_idle(5)
    assert freelancer.lookups[7] == 2, "refreshed ahead once"
    clock.advance(TTL * 0.5)  # the first copy is stale by now; the refreshed one is fresh
    user = (await running.lookup(7))["users"][0]
    assert (user["source"], user["created_at"]) == ("cache", created)
