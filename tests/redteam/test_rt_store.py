"""Red team, the store path: each test here breaks a promise of the README (they FAIL on
the code they were written against; each docstring says the interleaving)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path


from app.domain import UserRecord
from app.store import SqliteUserStore
from tests.support.apps import FlakyStore, StartApp, until
from tests.support.freelancer import FakeFreelancer

X, Y = 501, 502


class Gate:
    """An `after_read` hook: records that a read reached it, then waits to be opened."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.open = asyncio.Event()

    async def __call__(self) -> None:
        self.arrived.set()
        await asyncio.wait_for(self.open.wait(), 10)


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


async def save_directly(path: Path, records: list[UserRecord]) -> None:
    """Users saved as an earlier process of the deployment did."""
    store = SqliteUserStore(path)
    await store.open()
    try:
        await store.upsert_many(records)
    finally:
        await store.close()


async def stored_ids(path: Path, ids: list[int]) -> set[int]:
    """What the file holds, read on a connection of its own."""
    store = SqliteUserStore(path)
    await store.open()
    try:
        return set(await store.get_many(ids))
    finally:
        await store.close()


async def test_an_eviction_is_undone_in_memory_by_a_store_read_in_flight(
    start_app: StartApp, freelancer: FakeFreelancer, tmp_path: Path
) -> None:
    """Promise 4 (an eviction is not undone). A lookup's store read returns X's row, the
    DELETE lands before the read is handed back; `Memory.answer` then holds the evicted
    copy, and every later lookup is a memory hit on it: no refetch, ever (until TTL)."""
    now = time.time()
    await save_directly(
        tmp_path / "users.db", [UserRecord(X, "kept", created_at=now, fetched_at=now)]
    )
    store = FlakyStore(tmp_path / "users.db")
    running = await start_app(store=store)  # X in the store, not in memory (a restart)
    gate = Gate()
    store.after_read = gate
    reading = asyncio.create_task(running.lookup(X))
    await asyncio.wait_for(gate.arrived.wait(), 5)  # the row is read, not yet handed back
    evicted = await running.client.delete(f"/api/cache/users/{X}")
    assert evicted.status_code in (200, 204), evicted.text
    gate.open.set()
    store.after_read = None
    await reading  # began before the eviction: its old copy is fair
    assert await running.gateway.wait_idle(5)
    calls = freelancer.lookups[X]
    after = await running.lookup(X)
    assert after["users"][0]["source"] == "fetched", (
        f"the evicted copy came back from memory: {after['users'][0]['source']}"
    )
    assert freelancer.lookups[X] == calls + 1


async def test_an_eviction_during_a_failing_save_is_undone_by_the_next_save(
    start_app: StartApp, freelancer: FakeFreelancer, tmp_path: Path
) -> None:
    """Promise 4. X's save is failing its retries when X is evicted (`forget` drops only
    `_unsaved`, X sits in the save's own `pending`); the failed save puts X back into
    `_unsaved`, and the next batch's successful save writes the evicted copy back."""
    store = HeldSaves(tmp_path / "users.db", failing_saves=3)
    store.save_gate = asyncio.Event()
    running = await start_app(store=store, store_save_attempts=3)
    await running.lookup(X)
    await asyncio.wait_for(store.save_arrived.wait(), 5)  # X's first save attempt
    evicted = await running.client.delete(f"/api/cache/users/{X}")
    assert evicted.status_code in (200, 204), evicted.text
    store.save_gate.set()
    await until(lambda: len(store.save_attempts) >= 3)
    assert await running.gateway.wait_idle(5)
    await running.lookup(Y)  # the store is back: this batch's save succeeds
    assert await running.gateway.wait_idle(5)
    await until(lambda: not running.gateway.writes.pending)
    assert await stored_ids(tmp_path / "users.db", [Y]) == {Y}
    assert await stored_ids(tmp_path / "users.db", [X]) == set(), (
        "the copy evicted while its save was failing was written back"
    )


async def test_a_job_fetch_completing_during_a_lookups_store_read_is_fetched_again(
    start_app: StartApp, freelancer: FakeFreelancer, tmp_path: Path
) -> None:
    """Promise 1 (once per id; trap 1, the miss that races the completion). A crawl job's
    fetch of X is in flight (background: memory will not hold X); a lookup of X misses
    memory and reads the store (X absent). The fetch completes and is saved; the lookup's
    read comes back empty, nothing in flight: X is sent to Freelancer a second time."""
    store = FlakyStore(tmp_path / "users.db")
    freelancer.gate = asyncio.Event()
    running = await start_app(store=store)
    job = await running.client.post("/api/jobs", json={"user_ids": [X]})
    assert job.status_code == 202, job.text
    await asyncio.wait_for(freelancer.arrived.wait(), 5)
    gate = Gate()
    store.after_read = gate
    lookup = asyncio.create_task(running.lookup(X))
    await asyncio.wait_for(gate.arrived.wait(), 5)  # read: X is not in the store yet
    freelancer.gate.set()
    await until(lambda: X not in running.gateway.inflight)
    assert await running.gateway.wait_idle(5)
    assert await stored_ids(tmp_path / "users.db", [X]) == {X}, "the job's fetch is saved"
    gate.open.set()
    store.after_read = None
    body = await lookup
    assert [u["user_id"] for u in body["users"]] == [X]
    assert freelancer.lookups[X] == 1, (
        f"X was sent upstream {freelancer.lookups[X]} times: the lookup missed the "
        "completed fetch it raced"
    )
