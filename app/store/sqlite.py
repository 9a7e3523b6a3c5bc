"""The embedded store: one SQLite file (WAL), one table keyed by user_id, through aiosqlite.

Every statement runs in one trip to the connection's thread and leaves no cursor open
(`execute_fetchall`, or a cursor closed by `async with`). A cursor dropped open would be
reset by the garbage collector on the event loop's thread, racing the connection's thread
when it runs the same cached statement ("bad parameter or other API misuse" under
concurrent saves). And every read is one trip: a cursor left open across an await would
hold a read snapshot, and a write on the same connection after another connection
committed would then fail at once with "database is locked".
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import aiosqlite

from app.domain import UserRecord
from app.errors import StoreUnavailable

COLUMNS = (
    "user_id",
    "username",
    "display_name",
    "country",
    "city",
    "role",
    "registration_date",
    "avatar_url",
    "created_at",
    "fetched_at",
)
SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user_id INTEGER PRIMARY KEY,
    username TEXT NOT NULL,
    display_name TEXT,
    country TEXT,
    city TEXT,
    role TEXT,
    registration_date REAL,
    avatar_url TEXT,
    created_at REAL NOT NULL,
    fetched_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS users_fetched_at ON users (fetched_at);
"""
SELECT = f"SELECT {', '.join(COLUMNS)} FROM users"
UPSERT = (
    f"INSERT INTO users ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)}) "
    "ON CONFLICT(user_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c not in ("user_id", "created_at"))
    # A late writer (a process that was paused while another refetched) never replaces
    # a newer copy with an older one.
    + " WHERE excluded.fetched_at >= users.fetched_at"
)
# SQLite caps the number of `?` in one statement; 500 stays well under every build's limit.
CHUNK = 500


class SqliteUserStore:
    """Users in a SQLite file at SQLITE_PATH; survives restarts."""

    kind: Literal["sqlite"] = "sqlite"
    setting = "SQLITE_PATH"

    def __init__(self, path: Path, *, timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        """Create the folder, the file and the table; WAL mode."""
        if self._db is not None:
            return
        async with self._failures():
            self._db = await connect(self.path, SCHEMA)

    async def close(self) -> None:
        """Close the connection, if open."""
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    async def ping(self) -> None:
        """Raise StoreUnavailable unless a trivial query answers."""
        async with self._guard() as db:
            await db.execute_fetchall("SELECT 1")

    async def get_many(self, user_ids: Collection[int]) -> dict[int, UserRecord]:
        """The stored users among `user_ids`, chunked `IN (...)` queries."""
        if not user_ids:
            return {}
        ids = list(user_ids)
        found: dict[int, UserRecord] = {}
        async with self._guard() as db:
            for start in range(0, len(ids), CHUNK):
                chunk = ids[start : start + CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = await db.execute_fetchall(f"{SELECT} WHERE user_id IN ({marks})", chunk)
                for row in rows:
                    found[row[0]] = _record(row)
        return found

    async def upsert_many(self, users: Sequence[UserRecord]) -> None:
        """Insert or update in one transaction; the first `created_at` is kept."""
        if not users:
            return
        rows = [tuple(getattr(u, c) for c in COLUMNS) for u in users]
        async with self._guard() as db:
            async with db.executemany(UPSERT, rows):
                pass
            await db.commit()

    async def delete(self, user_id: int) -> bool:
        """Remove one user; True when it was there."""
        async with self._guard() as db:
            async with db.execute("DELETE FROM users WHERE user_id = ?", (user_id,)) as cursor:
                deleted = cursor.rowcount
            await db.commit()
            return deleted > 0

    async def count(self) -> int:
        """How many users are stored."""
        async with self._guard() as db:
            rows = list(await db.execute_fetchall("SELECT COUNT(*) FROM users"))
        return int(rows[0][0]) if rows else 0

    async def delete_fetched_before(self, cutoff: float) -> int:
        """Remove users fetched before `cutoff`; how many went."""
        async with self._guard() as db:
            async with db.execute("DELETE FROM users WHERE fetched_at < ?", (cutoff,)) as cursor:
                deleted = cursor.rowcount
            await db.commit()
            return deleted

    async def fetched_before(self, cutoff: float, *, limit: int) -> list[UserRecord]:
        """Up to `limit` users fetched before `cutoff`, oldest first."""
        query = f"{SELECT} WHERE fetched_at < ? ORDER BY fetched_at LIMIT ?"
        async with self._guard() as db:
            return [_record(row) for row in await db.execute_fetchall(query, (cutoff, limit))]

    def _guard(self) -> AbstractAsyncContextManager[aiosqlite.Connection]:
        return guard(self._db, self.path, self.timeout_s)

    def _failures(self) -> AbstractAsyncContextManager[None]:
        return failures(self.path, self.timeout_s)


@asynccontextmanager
async def guard(
    db: aiosqlite.Connection | None, path: Path, timeout_s: float
) -> AsyncIterator[aiosqlite.Connection]:
    """The open connection `db`, within the failure boundary."""
    async with failures(path, timeout_s):
        if db is None:
            raise StoreUnavailable(f"SQLite store at {path} is not open; check SQLITE_PATH")
        yield db


@asynccontextmanager
async def failures(path: Path, timeout_s: float) -> AsyncIterator[None]:
    """Bound the operation in time and turn every failure into StoreUnavailable."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except (sqlite3.Error, OSError, ValueError, TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        raise StoreUnavailable(
            f"SQLite store at {path} failed: {reason}; check SQLITE_PATH"
        ) from exc


async def connect(path: Path, schema: str) -> aiosqlite.Connection:
    """A connection to the file at `path` in WAL mode, with `schema` created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # BEGIN IMMEDIATE for every write: a deferred transaction that reads before it writes
    # fails at once ("database is locked") when the jobs' connection wrote in between,
    # instead of waiting its turn as an immediate one does.
    db = await aiosqlite.connect(path, isolation_level="IMMEDIATE")
    try:
        await db.execute_fetchall("PRAGMA journal_mode=WAL")
        await db.execute_fetchall("PRAGMA synchronous=NORMAL")
        await db.executescript(schema)
        await db.commit()
    except BaseException:
        await db.close()
        raise
    return db


def _record(row: Any) -> UserRecord:
    return UserRecord(*row)
