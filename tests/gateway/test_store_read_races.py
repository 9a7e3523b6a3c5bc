"""Red team, the store path: each test here breaks a promise of the README (they FAIL on
the code they were written against; each docstring says the interleaving)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from app.domain import UserRecord
from app.store import SqliteUserStore
from tests.store.raw import stored_ids
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


async def save_directly(path: Path, records: list[UserRecord]) -> None:
    """Users saved as an earlier process of the deployment did."""
    store = SqliteUserStore(path)
    await store.open()
    try:
        await store.upsert_many(records)
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
    await reading  # began before the eviction: it may answer either copy
    assert await running.gateway.wait_idle(5)
    after = await running.lookup(X)
    assert after["users"][0]["username"] == f"user{X}", (
        f"the evicted copy came back from memory: {after['users'][0]}"
    )
    assert freelancer.lookups[X] == 1, "fetched once after the eviction"


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


async def test_a_job_fetched_user_waiting_in_write_behind_is_fetched_again_by_a_lookup(
    start_app: StartApp, freelancer: FakeFreelancer, tmp_path: Path
) -> None:
    """Promise 1, with the store failing for a while (promise 2's case). A crawl job
    fetches X; memory does not hold it (a job's fetch) and its save fails: X waits in
    write-behind's buffer. A lookup of X misses memory and the store, and the buffer is
    never consulted: X is sent to Freelancer again though its fresh copy is right here."""
    store = FlakyStore(tmp_path / "users.db", failing_saves=1000)
    running = await start_app(store=store, store_save_attempts=1)
    job = await running.client.post("/api/jobs", json={"user_ids": [X]})
    assert job.status_code == 202, job.text
    await until(lambda: freelancer.lookups[X] == 1 and X not in running.gateway.inflight)
    await until(lambda: running.gateway.writes.held(X) is not None)
    assert X not in running.gateway.memory.users
    body = await running.lookup(X)
    assert [u["user_id"] for u in body["users"]] == [X]
    assert freelancer.lookups[X] == 1, (
        f"X was sent upstream {freelancer.lookups[X]} times while its fresh copy waited "
        f"in write-behind (answered as {body['users'][0]['source']!r})"
    )
