"""The store path read on the event loop's thread (`read_now`): store hits answered in one
step, a locked or failing file never holding up the loop, and failures still reported."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from app.domain import UserRecord
from app.gateway.results import LookupResult
from app.store import SqliteUserStore
from app.store.sqlite import connect_now
from tests.support.apps import StartApp
from tests.support.freelancer import FakeFreelancer

IDS = list(range(1, 51))


async def saved(path: Path, ids: list[int]) -> None:
    """Users saved by an earlier process of the deployment (in the store, not in memory)."""
    store = SqliteUserStore(path)
    await store.open()
    now = time.time()
    try:
        await store.upsert_many(
            [UserRecord(i, f"u{i}", created_at=now, fetched_at=now) for i in ids]
        )
    finally:
        await store.close()


async def test_a_batch_of_store_hits_is_answered_in_one_step_without_a_call(
    start_app: StartApp, freelancer: FakeFreelancer, tmp_path: Path
) -> None:
    await saved(tmp_path / "users.db", IDS)
    running = await start_app()
    result = running.gateway.lookup_now(IDS)  # no await: memory, then the store, then done
    assert isinstance(result, LookupResult)
    assert [u[0].split(b",")[0] for u in result.users] == [b'{"user_id":%d' % i for i in IDS]
    body = await running.lookup(*IDS)  # and over HTTP, now from memory
    assert [u["user_id"] for u in body["users"]] == IDS
    assert freelancer.calls == []


def test_a_locked_file_is_given_up_at_once(tmp_path: Path) -> None:
    """`read_now`'s connection never waits for a lock (the loop would wait with it)."""
    path = tmp_path / "locked.db"
    writer = sqlite3.connect(path, isolation_level=None)  # a rollback journal: readers wait
    writer.execute("CREATE TABLE users (user_id INTEGER PRIMARY KEY, fetched_at REAL, json BLOB)")
    writer.execute("BEGIN EXCLUSIVE")
    reader = connect_now(path)
    started = time.perf_counter()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        reader.execute("SELECT user_id FROM users").fetchall()
    assert time.perf_counter() - started < 0.1
    writer.execute("COMMIT")
    assert reader.execute("SELECT user_id FROM users").fetchall() == []
    reader.close()
    writer.close()


async def test_a_failing_file_is_left_to_the_threaded_read_which_reports_it(
    start_app: StartApp, freelancer: FakeFreelancer, tmp_path: Path
) -> None:
    await saved(tmp_path / "users.db", IDS)
    running = await start_app()
    store = running.gateway.store
    assert store.read_now(IDS[:2]) is not None
    other = sqlite3.connect(tmp_path / "users.db")
    other.execute("DROP TABLE users")  # every read now fails ("no such table")
    other.commit()
    other.close()
    assert store.read_now(IDS[:2]) is None  # no exception on the loop's thread
    started = time.perf_counter()
    response = await running.client.post("/api/users", json={"user_ids": IDS[:2]})
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "store_unavailable"
    assert "SQLITE_PATH" in response.text
    assert time.perf_counter() - started < 5
    assert freelancer.calls == []


async def test_a_store_not_open_answers_none(tmp_path: Path) -> None:
    store = SqliteUserStore(tmp_path / "users.db")
    assert store.read_now([1]) is None
    await store.open()
    assert store.read_now([1]) == {}
    await store.close()
    assert store.read_now([1]) is None
