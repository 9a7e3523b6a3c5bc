"""What only the SQLite store does: a real file that survives restarts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiosqlite
import pytest

from app.domain import UserRecord
from app.errors import StoreUnavailable
from app.store import SqliteUserStore


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
