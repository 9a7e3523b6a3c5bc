"""The embedded store: one SQLite file (WAL), one table keyed by user_id, through aiosqlite."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
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
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self.path)
            try:
                await db.execute("PRAGMA journal_mode=WAL")
                await db.execute("PRAGMA synchronous=NORMAL")
                await db.executescript(SCHEMA)
                await db.commit()
            except BaseException:
                await db.close()
                raise
            self._db = db

    async def close(self) -> None:
        """Close the connection, if open."""
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    async def ping(self) -> None:
        """Raise StoreUnavailable unless a trivial query answers."""
        async with self._guard() as db:
            await db.execute("SELECT 1")

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
                async with db.execute(f"{SELECT} WHERE user_id IN ({marks})", chunk) as cursor:
                    for row in await cursor.fetchall():
                        found[row[0]] = _record(row)
        return found

    async def upsert_many(self, users: Sequence[UserRecord]) -> None:
        """Insert or update in one transaction; the first `created_at` is kept."""
        if not users:
            return
        rows = [tuple(getattr(u, c) for c in COLUMNS) for u in users]
        async with self._guard() as db:
            await db.executemany(UPSERT, rows)
            await db.commit()

    async def delete(self, user_id: int) -> bool:
        """Remove one user; True when it was there."""
        async with self._guard() as db:
            cursor = await db.execute("DELETE FROM users WHERE user_id = ?", (user_id,))
            await db.commit()
            return cursor.rowcount > 0

    async def count(self) -> int:
        """How many users are stored."""
        async with self._guard() as db, db.execute("SELECT COUNT(*) FROM users") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def delete_fetched_before(self, cutoff: float) -> int:
        """Remove users fetched before `cutoff`; how many went."""
        async with self._guard() as db:
            cursor = await db.execute("DELETE FROM users WHERE fetched_at < ?", (cutoff,))
            await db.commit()
            return cursor.rowcount

    async def fetched_before(self, cutoff: float, *, limit: int) -> list[UserRecord]:
        """Up to `limit` users fetched before `cutoff`, oldest first."""
        query = f"{SELECT} WHERE fetched_at < ? ORDER BY fetched_at LIMIT ?"
        async with self._guard() as db, db.execute(query, (cutoff, limit)) as cursor:
            return [_record(row) for row in await cursor.fetchall()]

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[aiosqlite.Connection]:
        """The open connection, within the failure boundary."""
        async with self._failures():
            if self._db is None:
                raise StoreUnavailable(
                    f"SQLite store at {self.path} is not open; check SQLITE_PATH"
                )
            yield self._db

    @asynccontextmanager
    async def _failures(self) -> AsyncIterator[None]:
        """Bound the operation in time and turn every failure into StoreUnavailable."""
        try:
            async with asyncio.timeout(self.timeout_s):
                yield
        except (sqlite3.Error, OSError, ValueError, TimeoutError) as exc:
            reason = (
                "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            )
            raise StoreUnavailable(
                f"SQLite store at {self.path} failed: {reason}; check SQLITE_PATH"
            ) from exc


def _record(row: Any) -> UserRecord:
    return UserRecord(*row)
