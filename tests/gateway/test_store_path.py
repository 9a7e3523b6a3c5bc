"""The store path: users in the store but not in memory (after a restart, or past
MEMORY_CACHE_SIZE) answer byte for byte what memory would, without a call upstream."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from app.domain import UserRecord
from app.errors import StoreUnavailable
from app.gateway.stats import GatewayStats
from app.gateway.write_behind import WriteBehind
from tests.store.raw import file_from_before_the_json
from tests.support.apps import GatedReads, Running, StartApp, make_settings, until
from tests.support.clock import FakeClock
from tests.support.freelancer import FakeFreelancer, error_response

TTL = 1000.0
IDS = [5, 3, 8]


async def bodies(running: Running, ids: list[int]) -> tuple[bytes, bytes]:
    """The raw answers of a batch lookup and of a one-user lookup (the first id)."""
    batch = await running.client.post("/api/users", json={"user_ids": ids})
    single = await running.client.get(f"/api/users/{ids[0]}")
    assert batch.status_code == single.status_code == 200, (batch.text, single.text)
    return batch.content, single.content


async def test_store_hits_answer_byte_for_byte_what_memory_hits_do(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    clock = FakeClock()
    settings = {"clock": clock, "cache_ttl_s": TTL, "upstream_max_attempts": 1}
    first = await start_app(**settings)
    await first.lookup(*IDS)
    assert await first.gateway.wait_idle(5)
    from_memory = await bodies(first, IDS)
    assert b'"source":"cache","stale":false' in from_memory[0]
    # A second process on the same file has nothing in memory: its first answer comes
    # from the store.
    second = await start_app(**settings)
    assert len(second.gateway.memory) == 0
    assert await bodies(second, IDS) == from_memory
    # Stale copies, their refreshes failing: served from memory and from the store alike.
    clock.advance(TTL + 1)
    freelancer.always = error_response(500)
    stale_from_memory = await bodies(first, IDS)
    assert b'"source":"stale","stale":true' in stale_from_memory[0]
    third = await start_app(**settings)
    assert await bodies(third, IDS) == stale_from_memory
    assert freelancer.lookups.keys() == set(IDS)
    assert all(freelancer.lookups[uid] >= 1 for uid in IDS)
    for running in (first, second, third):
        assert await running.gateway.wait_idle(5)
    calls_for_misses = [call for call in freelancer.calls if call == sorted(IDS)]
    assert len(calls_for_misses) <= 1, "only the first lookup fetched; the rest refreshed"


async def test_past_memory_s_bound_users_come_back_from_the_store_without_a_call(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(memory_cache_size=1000, key_misses_per_min=10_000)
    for start in range(1, 1001, 100):
        await running.lookup(*range(start, start + 100))
    before = await running.client.post("/api/users", json={"user_ids": IDS})
    for start in range(2001, 3001, 100):  # 1 000 other users push the first out of memory
        await running.lookup(*range(start, start + 100))
    assert await running.gateway.wait_idle(5)
    assert not any(uid in running.gateway.memory.users for uid in IDS)
    calls = len(freelancer.calls)
    again = await running.client.post("/api/users", json={"user_ids": IDS})
    assert again.content == before.content
    assert len(freelancer.calls) == calls, "served from the store"


async def test_a_cache_kept_by_an_earlier_version_is_served_after_the_upgrade(
    start_app: StartApp, freelancer: FakeFreelancer, tmp_path: Path
) -> None:
    clock = FakeClock()
    now = clock()
    kept = [
        UserRecord(i, f"kept{i}", "Kept", "Kenya", "Nairobi", "freelancer", 1.4e9, None, 1e9, now)
        for i in IDS
    ]
    file_from_before_the_json(tmp_path / "users.db", kept)
    running = await start_app(clock=clock)
    from_store = await bodies(running, IDS)
    assert freelancer.calls == [], "the earlier version's cache answered"
    assert [u["username"] for u in (await running.lookup(*IDS))["users"]] == [
        f"kept{i}" for i in IDS
    ]
    assert await bodies(running, IDS) == from_store, "as memory answers it"


async def gated_writes(tmp_path: Path) -> tuple[GatedReads, WriteBehind]:
    store = GatedReads(tmp_path / "users.db")
    await store.open()
    now = time.time()
    await store.upsert_many(
        [UserRecord(i, f"u{i}", created_at=now, fetched_at=now) for i in range(1, 9)]
    )
    settings = make_settings(tmp_path)
    return store, WriteBehind(store, stats=GatewayStats(), settings=settings)


async def test_lookups_reading_the_store_meanwhile_share_the_next_query(tmp_path: Path) -> None:
    store, writes = await gated_writes(tmp_path)
    store.gate = asyncio.Event()
    first = asyncio.create_task(writes.read_rendered([1, 2]))
    await until(lambda: len(store.reads) == 1)
    others = [asyncio.create_task(writes.read_rendered(ids)) for ids in ([3, 4], [4, 5], [9])]
    await asyncio.sleep(0)
    store.gate.set()
    assert sorted(await first) == [1, 2]
    assert [sorted(await task) for task in others] == [[3, 4], [4, 5], []]
    assert store.reads == [[1, 2], [3, 4, 5, 9]], "the three waiting lookups: one query"
    assert sorted(await writes.read_rendered([6])) == [6], "alone again: a read of its own"
    await store.close()


async def test_a_lookup_that_gives_up_does_not_cancel_the_read_others_wait_for(
    tmp_path: Path,
) -> None:
    store, writes = await gated_writes(tmp_path)
    store.gate = asyncio.Event()
    first = asyncio.create_task(writes.read_rendered([1]))
    await until(lambda: len(store.reads) == 1)
    leaving = asyncio.create_task(writes.read_rendered([2]))
    staying = asyncio.create_task(writes.read_rendered([3]))
    await asyncio.sleep(0)
    first.cancel()  # the lookup whose read is on its way gives up
    leaving.cancel()  # and one waiting for the next read
    await until(lambda: len(store.reads) == 2)
    store.gate.set()
    assert sorted(await staying) == [3]
    assert first.cancelled() and leaving.cancelled()
    await store.close()


async def test_a_failed_shared_read_fails_every_lookup_that_waits_for_it(tmp_path: Path) -> None:
    store, writes = await gated_writes(tmp_path)
    store.gate = asyncio.Event()
    first = asyncio.create_task(writes.read_rendered([1]))
    await until(lambda: len(store.reads) == 1)
    waiting = [asyncio.create_task(writes.read_rendered([i])) for i in (2, 3)]
    await asyncio.sleep(0)
    store.fail = True
    store.gate.set()
    for task in (first, *waiting):
        with pytest.raises(StoreUnavailable, match="SQLITE_PATH"):
            await task
    assert len(store.reads) == 2 and not writes.store_ready
    assert writes.stats.store_errors == 2
    store.fail = False
    assert sorted(await writes.read_rendered([4])) == [4] and writes.store_ready
    await store.close()
