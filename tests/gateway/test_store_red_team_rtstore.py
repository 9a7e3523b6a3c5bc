"""Red team of the store path after the loop-thread read, admission and chunked saves:
each test here failed on the code it was written against (the docstring says how)."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from app.coordination.redis_coordinator import RedisCoordinator
from app.domain import UserRecord
from app.gateway.results import Outcome
from app.gateway.stats import GatewayStats
from app.gateway.write_behind import WriteBehind
from tests.gateway.conftest import StartGateway
from tests.gateway.test_store_read_faults import HeldSaves
from tests.gateway.test_store_read_races import save_directly
from tests.store.raw import stored_ids
from tests.support.apps import FlakyStore, StartApp, make_settings, until
from tests.support.freelancer import FakeFreelancer, SlowUpstream

X, Y, Z = 501, 502, 503


@pytest.mark.redis
async def test_a_job_fetch_is_not_fetched_again_by_a_lookup_while_redis_hears_of_it(
    start_gateway: StartGateway,
) -> None:
    """Once per id. A crawl job's fetch of X completes (memory does not hold a job's
    user); the worker then announces it over Redis (a round trip) before handing it to
    write-behind. A lookup of X in that round trip misses memory, misses the store on
    the loop's thread (`read_now`, no await for the save to begin), finds nothing held
    and nothing in flight: X is sent to Freelancer a second time."""
    upstream = SlowUpstream(delay_s=0.01)
    gateway = await start_gateway(upstream)
    coordinator = gateway.coordinator
    assert isinstance(coordinator, RedisCoordinator)
    announcing = asyncio.Event()
    go_on = asyncio.Event()
    announce = coordinator.announce

    async def slow_announce(outcomes: Mapping[int, Outcome]) -> None:
        if X in outcomes:  # Redis is slow to answer this once
            announcing.set()
            await asyncio.wait_for(go_on.wait(), 10)
        await announce(outcomes)

    coordinator.announce = slow_announce  # type: ignore[method-assign]
    gateway.enlist([X], {})
    await asyncio.wait_for(announcing.wait(), 5)
    assert X not in gateway.inflight and X not in gateway.memory.users
    lookup = asyncio.create_task(gateway.lookup([X]))
    await until(lambda: lookup.done() or X in gateway.inflight)
    go_on.set()  # (a lookup that registered a fetch waits for the lease this frees)
    result = await asyncio.wait_for(lookup, 5)
    assert result.user_ids == [X]
    assert await gateway.wait_idle(5)
    assert upstream.calls == [[X]], f"X was sent upstream {len(upstream.calls)} times"


async def failing_saves(
    tmp_path: Path, *, attempts: int
) -> tuple[FlakyStore, WriteBehind, UserRecord]:
    """A store whose first two saves fail, its write-behind trying `attempts` times a save,
    and X's copy fetched a minute ago (before the eviction the tests make)."""
    store = FlakyStore(tmp_path / "users.db", failing_saves=2)
    await store.open()
    writes = WriteBehind(
        store,
        stats=GatewayStats(),
        settings=make_settings(tmp_path, store_save_attempts=attempts),
    )
    now = time.time()
    old = UserRecord(X, "before-the-eviction", created_at=now - 60, fetched_at=now - 60)
    return store, writes, old


async def test_an_eviction_during_a_failing_save_is_not_undone_by_the_next_save(
    tmp_path: Path,
) -> None:
    """An eviction is never undone by a save. X waits in write-behind (an earlier save
    failed; its batch's worker has moved on). The next save takes X in its chunk; while
    that save is under way X is evicted (DELETE /api/cache/users/X: `forget`, then the
    row deleted). The save fails, and the chunk goes back to the buffer with X in it:
    the save after that writes the evicted copy back into the store."""
    store, writes, old = await failing_saves(tmp_path, attempts=1)
    now = time.time()
    await writes.save([old])  # fails: X is held for the next save
    assert writes.held(X) is old
    upsert = store.upsert_many
    in_save = asyncio.Event()
    evicted = asyncio.Event()

    async def held_up(users: Sequence[UserRecord]) -> None:
        in_save.set()
        await asyncio.wait_for(evicted.wait(), 5)
        await upsert(users)  # the second failure

    store.upsert_many = held_up  # type: ignore[method-assign]
    saving = asyncio.create_task(writes.save([UserRecord(Y, "other", fetched_at=now)]))
    await asyncio.wait_for(in_save.wait(), 5)
    await writes.delete(X)  # the eviction, while the chunk holding X is being written
    evicted.set()
    await saving
    store.upsert_many = upsert  # type: ignore[method-assign]
    await writes.save([])  # the store is back: what failed is written
    assert await stored_ids(tmp_path / "users.db", [Y]) == {Y}
    assert writes.held(X) is None, "the evicted copy is still held"
    assert await stored_ids(tmp_path / "users.db", [X]) == set(), (
        "the eviction was undone: the copy fetched before it is back in the store"
    )
    await store.close()


async def test_an_eviction_between_two_tries_of_a_save_is_not_undone_by_the_retry(
    tmp_path: Path,
) -> None:
    """As above, with the save's second try succeeding: X's row is deleted between the
    first (failed) try and the retry, which writes the evicted copy back."""
    store, writes, old = await failing_saves(tmp_path, attempts=2)
    now = time.time()
    upsert = store.upsert_many
    tries = 0

    async def evicted_after_the_first_try(users: Sequence[UserRecord]) -> None:
        nonlocal tries
        tries += 1
        if tries == 1:
            await writes.delete(X)  # the eviction arrives while the first try fails
        await upsert(users)

    store.failing_saves = 1
    store.upsert_many = evicted_after_the_first_try  # type: ignore[method-assign]
    await writes.save([old, UserRecord(Y, "other", fetched_at=now)])
    assert tries == 2
    assert await stored_ids(tmp_path / "users.db", [Y]) == {Y}
    assert await stored_ids(tmp_path / "users.db", [X]) == set(), (
        "the eviction was undone by the save's retry"
    )
    await store.close()


async def test_over_http_an_evicted_backlog_user_is_not_written_back(
    start_app: StartApp, freelancer: FakeFreelancer, tmp_path: Path
) -> None:
    """The first eviction test through the app: X's save failed (X waits in the buffer);
    Y's batch's save takes X along and is failing when DELETE /api/cache/users/X comes;
    Y's worker drops only its own evicted users, so X went back to the buffer and the
    next batch's save (the store back) wrote the evicted copy into the store."""
    store = HeldSaves(tmp_path / "users.db", failing_saves=2)
    running = await start_app(store=store, store_save_attempts=1)
    await running.lookup(X)
    assert await running.gateway.wait_idle(5)
    assert running.gateway.writes.held(X) is not None, "X's save failed: X waits"
    store.save_gate = asyncio.Event()
    store.save_arrived.clear()
    await running.lookup(Y)
    await asyncio.wait_for(store.save_arrived.wait(), 5)  # X and Y in one failing save
    evicted = await running.client.delete(f"/api/cache/users/{X}")
    assert evicted.status_code in (200, 204), evicted.text
    store.save_gate.set()
    await until(lambda: len(store.save_attempts) >= 2)
    assert await running.gateway.wait_idle(5)
    await running.lookup(Z)  # the store is back: this batch's save writes the buffer
    assert await running.gateway.wait_idle(5)
    await until(lambda: not running.gateway.writes.holding)
    assert await stored_ids(tmp_path / "users.db", [X, Y, Z]) == {Y, Z}, (
        "the evicted copy of X is back in the store"
    )
    assert freelancer.lookups[X] == 1


async def test_a_copy_fetched_after_an_eviction_is_not_deleted_by_the_older_batchs_undo(
    start_app: StartApp, freelancer: FakeFreelancer, tmp_path: Path
) -> None:
    """Nothing lost. X's first save is on its way to the store when X is evicted; a lookup
    then fetches X again (a copy from after the eviction), saved after the first. The
    first batch's worker then undoes its save of the evicted copy (`evicted_since_fetch`
    -> `WriteBehind.delete`), which deletes the row whatever copy it holds: the copy
    fetched after the eviction is gone from the store (a restart, or another process,
    fetches X again)."""
    store = HeldSaves(tmp_path / "users.db")
    store.save_gate = asyncio.Event()
    running = await start_app(store=store)
    await running.lookup(X)
    await asyncio.wait_for(store.save_arrived.wait(), 5)  # X's save is on its way
    evicted = await running.client.delete(f"/api/cache/users/{X}")
    assert evicted.status_code in (200, 204), evicted.text
    again = await running.lookup(X)  # fetched again: the eviction asked for a new copy
    assert freelancer.lookups[X] == 2
    store.save_gate.set()
    assert await running.gateway.wait_idle(5)
    await until(lambda: not running.gateway.writes.holding)
    forgetting = [t for t in running.gateway._tasks if t.get_name() == "forget"]
    await asyncio.wait_for(asyncio.gather(*forgetting), 5)  # the eviction's own delete
    assert await stored_ids(tmp_path / "users.db", [X]) == {X}, (
        "the copy fetched after the eviction was deleted from the store"
    )
    assert again["users"][0]["user_id"] == X


async def test_a_store_file_overwritten_in_place_is_a_503_not_a_miss(
    start_app: StartApp, freelancer: FakeFreelancer, tmp_path: Path
) -> None:
    """Faults answer in time; once per id. An operator copies another SQLite file over the
    store's (`cp other.db users.db`: the file truncated, then rewritten). The threaded
    read fails ("no such table"), but the loop-thread read, on a file mapped into memory,
    answered {}: every stored user a miss, sent to Freelancer again (seen failing so)."""
    path = tmp_path / "users.db"
    now = time.time()
    await save_directly(
        path, [UserRecord(i, "u" * 200, created_at=now, fetched_at=now) for i in range(1, 3001)]
    )
    running = await start_app()
    assert len(running.gateway.store.read_now(range(1, 51)) or {}) == 50
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    db.close()
    shutil.copyfile(other, path)
    response = await running.client.post("/api/users", json={"user_ids": [1, 2]})
    assert freelancer.calls == [], "stored users sent to Freelancer again"
    # A read from the file fails (503); one the read connection's page cache still
    # answers gives the users as they were stored. Never a miss.
    if response.status_code == 503:
        assert response.json()["error"] == "store_unavailable"
    else:
        assert response.status_code == 200, response.text
        assert [u["username"] for u in response.json()["users"]] == ["u" * 200] * 2


TRUNCATED = """
import asyncio, os, sqlite3, sys, time
from pathlib import Path
from app.domain import UserRecord
from app.errors import StoreUnavailable
from app.store import SqliteUserStore

async def main() -> None:
    path = Path(sys.argv[1])
    store = SqliteUserStore(path, timeout_s=2.0)
    await store.open()
    now = time.time()
    await store.upsert_many(
        [UserRecord(i, "u" * 200, created_at=now, fetched_at=now) for i in range(1, 3001)]
    )
    with sqlite3.connect(path) as other:  # the WAL written into the file
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    other.close()
    assert len(store.read_now(range(1, 3001)) or {}) == 3000
    os.truncate(path, 4096)  # another program truncates the file under the process
    print("read_now", store.read_now(range(1, 3001)), flush=True)
    try:
        await store.get_rendered(list(range(1, 3001)))
    except StoreUnavailable as exc:
        print("threaded StoreUnavailable", exc, flush=True)
    await store.close()

asyncio.run(main())
"""


def test_a_store_file_truncated_under_the_process_is_reported_not_a_crash(
    tmp_path: Path,
) -> None:
    """Faults answer in time (no crash). The store's file truncated by another program
    while it is open: reading a page the file mapped into memory no longer has killed
    the process with SIGBUS (exit -7), where reads from the file report the fault."""
    done = subprocess.run(
        [sys.executable, "-c", TRUNCATED, str(tmp_path / "users.db")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stdout} {done.stderr[-500:]}"
    assert "read_now None" in done.stdout
    assert "threaded StoreUnavailable" in done.stdout
