"""Red team, the store path: attacks that failed. Kept as regression tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.domain import UserRecord
from app.errors import StoreUnavailable
from app.gateway.cache import LRU
from app.gateway.stats import GatewayStats
from app.gateway.write_behind import WriteBehind
from tests.store.raw import stored_ids
from tests.support.apps import FlakyStore, GatedReads, StartApp, make_settings, until
from tests.support.freelancer import FakeFreelancer

X, Y = 501, 502


class HeldSaves(FlakyStore):
    """A FlakyStore whose saves wait at `save_gate` (when set) before they run or fail."""

    def __init__(self, path: Path, *, failing_saves: int = 0) -> None:
        super().__init__(path, failing_saves=failing_saves)
        self.save_gate: asyncio.Event | None = None
        self.save_arrived = asyncio.Event()

    async def upsert_many(self, users: Sequence[UserRecord]) -> None:
        self.save_arrived.set()
        if self.save_gate is not None:
            await asyncio.wait_for(self.save_gate.wait(), 10)
        await super().upsert_many(users)


async def test_an_eviction_during_a_failing_save_is_not_written_back_later(
    start_app: StartApp, freelancer: FakeFreelancer, tmp_path: Path
) -> None:
    """X's save is failing its retries when X is evicted: the failed save puts X back in
    the unsaved buffer, but the batch then drops it (evicted since fetched), so the next
    batch's successful save does not write the evicted copy back."""
    store = HeldSaves(tmp_path / "users.db", failing_saves=3)
    store.save_gate = asyncio.Event()
    running = await start_app(store=store, store_save_attempts=3)
    await running.lookup(X)
    await asyncio.wait_for(store.save_arrived.wait(), 5)  # X's first save attempt
    evicted = await running.client.delete(f"/api/cache/users/{X}")
    assert evicted.status_code in (200, 204), evicted.text
    store.save_gate.set()
    # X's save stops trying once X is evicted (nothing left in it to save); Y's batch
    # then meets the store's last failures and its last try succeeds.
    assert await running.gateway.wait_idle(5)
    await running.lookup(Y)  # the store comes back during this batch's save
    assert await running.gateway.wait_idle(5)
    await until(lambda: not running.gateway.writes.pending)
    assert await stored_ids(tmp_path / "users.db", [X, Y]) == {Y}


async def test_a_cancelled_leading_read_and_a_failed_shared_read_leave_no_one_hanging(
    tmp_path: Path,
) -> None:
    """The lookup whose read is on its way is cancelled (its client left) while three
    others queue for the next read: they still get their users. Then a shared read fails:
    every lookup in it gets StoreUnavailable (none hangs), and the next read works."""
    store = GatedReads(tmp_path / "users.db")
    await store.open()
    now = time.time()
    await store.upsert_many(
        [UserRecord(i, f"u{i}", created_at=now, fetched_at=now) for i in (1, 2, 3)]
    )
    writes = WriteBehind(store, stats=GatewayStats(), settings=make_settings(tmp_path))
    store.gate = asyncio.Event()
    leader = asyncio.create_task(writes.read_rendered([1]))
    await until(lambda: len(store.reads) == 1)
    followers = [asyncio.create_task(writes.read_rendered(ids)) for ids in ([2], [3], [2, 9])]
    await asyncio.sleep(0)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    store.gate.set()
    got = await asyncio.wait_for(asyncio.gather(*followers), 5)
    assert [sorted(g) for g in got] == [[2], [3], [2]]
    assert store.reads[1:] == [[2, 3, 9]]
    # A shared read that fails: each of its lookups hears it, in time.
    store.gate = asyncio.Event()
    store.fail = True
    leader = asyncio.create_task(writes.read_rendered([1]))
    await until(lambda: len(store.reads) == 3)
    shared = [asyncio.create_task(writes.read_rendered([i])) for i in (2, 3)]
    await asyncio.sleep(0)
    store.gate.set()
    results = await asyncio.wait_for(asyncio.gather(leader, *shared, return_exceptions=True), 5)
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    store.fail = False
    assert sorted(await asyncio.wait_for(writes.read_rendered([1, 2, 3]), 5)) == [1, 2, 3]
    await store.close()


@settings(max_examples=300, deadline=None)
@given(
    maxsize=st.integers(1, 3),
    ops=st.lists(st.tuples(st.sampled_from(["put", "get", "pop"]), st.integers(0, 5)), max_size=40),
)
def test_the_two_generation_lru_keeps_its_bounds_at_tiny_sizes(
    maxsize: int, ops: list[tuple[str, int]]
) -> None:
    """At maxsize 1-3: never more than maxsize entries; what was just put or read is there
    with its latest value; a popped key is gone; nothing comes back once dropped."""
    lru: LRU[int] = LRU(maxsize)
    latest: dict[int, int] = {}
    for step, (op, key) in enumerate(ops):
        if op == "put":
            lru.put(key, step)
            latest[key] = step
            assert lru.get(key) == step
        elif op == "get":
            value = lru.get(key)
            assert value is None or value == latest[key]
        else:
            lru.pop(key)
            assert key not in lru
        assert len(lru) <= maxsize
        assert set(lru.recent).isdisjoint(lru.older)
        for k, v in lru.items():
            assert v == latest[k]
