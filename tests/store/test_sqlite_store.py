"""What only the SQLite store does: a real file that survives restarts."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import aiosqlite
import pytest

from app.domain import UserRecord
from app.errors import StoreUnavailable
from app.store import SqliteUserStore
from tests.store.raw import file_from_before_the_json


async def test_users_survive_closing_and_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "folder" / "users.db"
    first = SqliteUserStore(path)
    await first.open()
    await first.upsert_many([UserRecord(1, "one", created_at=5.0, fetched_at=6.0)])
    await first.close()
    assert path.exists(), "the folder and the file were created"
    second = SqliteUserStore(path)
    await second.open()
    assert (await second.get_many([1]))[1].username == "one"
    await second.close()


async def test_the_file_is_in_wal_mode(tmp_path: Path) -> None:
    store = SqliteUserStore(tmp_path / "users.db")
    await store.open()
    await store.close()
    async with (
        aiosqlite.connect(tmp_path / "users.db") as db,
        db.execute("PRAGMA journal_mode") as cursor,
    ):
        assert await cursor.fetchone() == ("wal",)


async def test_an_unusable_path_fails_clearly_and_can_be_fixed(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = SqliteUserStore(blocker / "users.db")
    with pytest.raises(StoreUnavailable, match="SQLITE_PATH"):
        await store.open()
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.get_many([1])
    blocker.unlink()
    await store.open()
    assert await store.count() == 0
    await store.close()


async def test_close_is_safe_when_never_opened(tmp_path: Path) -> None:
    await SqliteUserStore(tmp_path / "users.db").close()


async def test_concurrent_saves_all_succeed(tmp_path: Path) -> None:
    """The write-behind and a crawl job save at the same moment: neither may fail. (A
    cursor dropped open on the event loop's thread once reset the cached statement under
    the connection's thread: "bad parameter or other API misuse", ~2 % of such saves.)"""
    store = SqliteUserStore(tmp_path / "users.db")
    await store.open()
    now = time.time()
    for round_no in range(10):
        first = round_no * 1000
        saves = [
            store.upsert_many(
                [
                    UserRecord(first + k * 20 + i, "u", created_at=now, fetched_at=now)
                    for i in range(20)
                ]
            )
            for k in range(50)
        ]
        await asyncio.gather(*saves)
    assert await store.count() == 10 * 50 * 20
    await store.close()


async def test_a_file_from_before_the_json_was_kept_is_upgraded_and_served(
    tmp_path: Path,
) -> None:
    """A user upgrading keeps their cache: the column is added, old rows answer as memory
    would, and two processes opening the file at once both open it."""
    path = tmp_path / "users.db"
    old = [UserRecord(i, f"u{i}", "Old User", created_at=5.5, fetched_at=6.25) for i in (1, 2)]
    file_from_before_the_json(path, old)
    first, second = SqliteUserStore(path), SqliteUserStore(path)
    await asyncio.gather(first.open(), second.open())
    assert await first.get_rendered([1, 2]) == {u.user_id: (u.rendered(), 6.25) for u in old}
    assert await second.count() == 2
    await first.close()
    await second.close()


async def test_a_batch_is_one_query_on_the_read_connection(tmp_path: Path) -> None:
    store = SqliteUserStore(tmp_path / "users.db")
    await store.open()
    now = time.time()
    await store.upsert_many(
        [UserRecord(i, "u", created_at=now, fetched_at=now) for i in range(100)]
    )
    reads: list[str] = []
    writes: list[str] = []
    assert store._reader is not None and store._db is not None
    await store._reader.set_trace_callback(reads.append)
    await store._db.set_trace_callback(writes.append)
    assert len(await store.get_rendered(list(range(100)))) == 100
    assert [sql.split()[0] for sql in reads] == ["SELECT"] and writes == []
    # Not mapped into memory: a truncated file would crash the process (SIGBUS).
    mapped = await store._reader.execute_fetchall("PRAGMA mmap_size")
    assert list(mapped) == [(0,)]
    assert store._now is not None
    assert store._now.execute("PRAGMA mmap_size").fetchall() == [(0,)]
    await store.close()


async def test_reads_do_not_wait_for_a_save_held_up_by_another_writer(tmp_path: Path) -> None:
    """A save waiting for the write lock (another process writing) holds up the write
    connection; a lookup's read must not queue behind it."""
    path = tmp_path / "users.db"
    store = SqliteUserStore(path)
    await store.open()
    now = time.time()
    await store.upsert_many([UserRecord(1, "one", created_at=now, fetched_at=now)])
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    save = asyncio.create_task(
        store.upsert_many([UserRecord(2, "two", created_at=now, fetched_at=now)])
    )
    await asyncio.sleep(0)  # the save is queued on the write connection, waiting for the lock
    try:
        found = await asyncio.wait_for(store.get_rendered([1, 2]), timeout=2)
        assert list(found) == [1]
        assert not save.done(), "the save was still waiting: the read did not queue behind it"
    finally:
        other.execute("ROLLBACK")
        other.close()
    await save
    assert sorted(await store.get_rendered([1, 2])) == [1, 2]
    await store.close()


async def test_processes_opening_a_file_not_in_wal_mode_at_once_all_open(tmp_path: Path) -> None:
    """Leaving a rollback journal for WAL needs the file alone, and SQLite does not wait for
    that: replicas starting together on such a file failed with "database is locked"."""
    for round_no in range(30):  # bounded; it failed within a few rounds before
        path = tmp_path / f"users-{round_no}.db"
        file_from_before_the_json(path, [UserRecord(1, "u1", created_at=1.0, fetched_at=2.0)])
        stores = [SqliteUserStore(path) for _ in range(6)]
        await asyncio.gather(*(store.open() for store in stores))
        for store in stores:
            assert await store.count() == 1
            await store.close()
