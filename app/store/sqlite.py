"""The embedded store: one SQLite file (WAL), one table keyed by user_id, through aiosqlite.

Each user's JSON (`UserRecord.rendered()`) is kept in a column beside its fields, so a
lookup's store hit is three columns joined into the answer as they are: one query for a
batch, on a read connection of its own (one aiosqlite thread), so reads never wait for a
save on the write connection (the file is not mapped into memory: see the note at
CHUNK). In `make bench` a store hit went from 19 % of a memory hit's speed to about
50 % with the file mapped (29-36 % without the map): rendering was most of the cost,
and reads queued behind saves on the one connection most of the rest.

Every statement runs in one trip to its connection's thread and leaves no cursor open
(`execute_fetchall`, or a cursor closed by `async with`). A cursor dropped open would be
reset by the garbage collector on the event loop's thread, racing the connection's thread
when it runs the same cached statement ("bad parameter or other API misuse" under
concurrent saves). And a cursor left open across an await would hold a read snapshot,
and a write on the same connection after another connection committed would then fail
at once with "database is locked".

`read_now` reads the lookups' users on the caller's (the event loop's) thread, with the
stdlib `sqlite3` on a third connection (query_only), skipping aiosqlite's trip to
its thread and back: a 50-id read took 110 µs so, 165 µs through aiosqlite (both with the
file mapped, before the map was dropped: about 33 µs more each without it). It can block
the loop only briefly: its busy timeout is 0, so when the file is locked (a WAL reader
waits only while another connection recovers the WAL or holds the file in exclusive
mode) it gives up at once and answers None, and the lookup reads through aiosqlite's
thread instead, which may wait (up to the store's timeout) without holding up the loop.
Any other failure also answers None: the threaded read then meets it too and reports it
as every read does (StoreUnavailable within the timeout, the store marked down). Rows
without their JSON also answer None (rendering them is the threaded read's work). What
it does not avoid: pages not yet in the page cache are read from the disk on the loop's
thread (a 50-id lookup touches at most about 50 pages: a few ms on a cold SSD, once),
and only lookups (at most MAX_USERS_PER_REQUEST ids) read this way, never a job.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import aiosqlite

from app.domain import StoredUser, UserRecord
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
    fetched_at REAL NOT NULL,
    json BLOB
);
CREATE INDEX IF NOT EXISTS users_fetched_at ON users (fetched_at);
"""
# A file made before the JSON was kept gets the column; its rows are rendered on read
# until their next save.
ADD_JSON = "ALTER TABLE users ADD COLUMN json BLOB"
SELECT = f"SELECT {', '.join(COLUMNS)} FROM users"
SELECT_RENDERED = "SELECT user_id, fetched_at, json FROM users"
UPSERT = (
    f"INSERT INTO users ({', '.join(COLUMNS)}, json) "
    f"VALUES ({', '.join('?' for _ in COLUMNS)}, ?) "
    "ON CONFLICT(user_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c not in ("user_id", "created_at"))
    # The JSON shows created_at to the second (`iso` truncates, as CAST does): when the
    # stored one, which is kept, shows otherwise, the JSON is dropped, to be rendered from
    # the fields on read.
    + ", json = CASE WHEN CAST(excluded.created_at AS INTEGER) = CAST(users.created_at AS"
    " INTEGER) THEN excluded.json END"
    # A late writer (a process that was paused while another refetched) never replaces
    # a newer copy with an older one.
     + " WHERE excluded.fetched_at >= users.fetched_at"
)
# SQLite caps the number of `?` in one statement; 500 stays well under every build's limit.
CHUNK = 500
# No connection maps the file into memory (PRAGMA mmap_size): a read through the map of
# a file another program truncated kills the process with SIGBUS, and one copied over in
# place was answered as "no users" (every stored user a miss, fetched again), where
# read() reports both (StoreUnavailable, a 503). The map saved about 33 us a 50-row read.
WAL_ATTEMPTS = 50


class SqliteUserStore:
    """Users in a SQLite file at SQLITE_PATH; survives restarts."""

    kind: Literal["sqlite"] = "sqlite"
    setting = "SQLITE_PATH"

    def __init__(self, path: Path, *, timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self._db: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._now: sqlite3.Connection | None = None
        """`read_now`'s connection, used on the event loop's thread only."""

    async def open(self) -> None:
        """Create the folder, the file and the table (WAL mode); open the read connection."""
        if self._db is not None:
            return
        async with self._failures():
            db = await connect(self.path, SCHEMA)
            try:
                await add_json_column(db)
                self._reader = await connect_reader(self.path)
                self._now = connect_now(self.path)
            except BaseException:
                if self._reader is not None:
                    await self._reader.close()
                    self._reader = None
                await db.close()
                raise
            self._db = db

    async def close(self) -> None:
        """Close both connections, if open."""
        db, self._db = self._db, None
        reader, self._reader = self._reader, None
        now, self._now = self._now, None
        if now is not None:
            now.close()
        for connection in (reader, db):
            if connection is not None:
                await connection.close()

    async def ping(self) -> None:
        """Raise StoreUnavailable unless a trivial query answers."""
        async with self._guard() as db:
            await run(db, "SELECT 1")

    async def _read(self, sql: str, params: Sequence[Any]) -> Iterable[Any]:
        """One query on the read connection (within a guard: open)."""
        assert self._reader is not None
        return await self._reader.execute_fetchall(sql, params)

    async def get_rendered(self, user_ids: Collection[int]) -> dict[int, StoredUser]:
        """The stored users among `user_ids`, their JSON as stored, in chunked `IN (...)`
        queries of three columns; rows without it (saved before it was kept) are read
        whole by a second query and rendered."""
        if not user_ids:
            return {}
        found: dict[int, StoredUser] = {}
        bare: list[int] = []
        async with self._guard():
            for sql, chunk in by_id_chunks(SELECT_RENDERED, user_ids):
                for uid, fetched, json in await self._read(sql, chunk):
                    if json is None:
                        bare.append(uid)
                    else:
                        found[uid] = (json, fetched)
            if bare:
                for uid, record in (await self.get_many(bare)).items():
                    found[uid] = (record.rendered(), record.fetched_at)
        return found

    def read_now(self, user_ids: Collection[int]) -> dict[int, StoredUser] | None:
        """`get_rendered` without an await, on this thread; None when it cannot answer so
        (not open, the file locked, any failure, a row without its JSON): see the module
        docstring."""
        db = self._now
        if db is None or self._db is None:
            return None
        found: dict[int, StoredUser] = {}
        try:
            for sql, chunk in by_id_chunks(SELECT_RENDERED, user_ids):
                for uid, fetched, json in db.execute(sql, chunk).fetchall():
                    if json is None:
                        return None
                    found[uid] = (json, fetched)
        except (sqlite3.Error, OSError, ValueError):
            return None
        return found

    async def get_many(self, user_ids: Collection[int]) -> dict[int, UserRecord]:
        """The stored users among `user_ids`, chunked `IN (...)` queries."""
        if not user_ids:
            return {}
        found: dict[int, UserRecord] = {}
        async with self._guard():
            for sql, chunk in by_id_chunks(SELECT, user_ids):
                for row in await self._read(sql, chunk):
                    found[row[0]] = _record(row)
        return found

    async def upsert_many(self, users: Sequence[UserRecord]) -> None:
        """Insert or update in one transaction; the first `created_at` is kept."""
        if not users:
            return
        rows = [(*u, u.rendered()) for u in users]
        async with self._guard() as db:
            await run_many(db, UPSERT, rows)
            await db.commit()

    async def delete(self, user_id: int, *, fetched_by: float | None = None) -> bool:
        """Remove one user; True when it was there. With `fetched_by`, only a copy
        fetched then or before."""
        query = "DELETE FROM users WHERE user_id = ?"
        args: list[float] = [user_id]
        if fetched_by is not None:
            query += " AND fetched_at <= ?"
            args.append(fetched_by)
        async with self._guard() as db:
            deleted = await run(db, query, args)
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
            deleted = await run(db, "DELETE FROM users WHERE fetched_at < ?", (cutoff,))
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


async def run(db: aiosqlite.Connection, query: str, args: Iterable[Any] = ()) -> int:
    """Run one statement; the rows it changed. Its cursor is closed on the connection's
    thread: a cursor dropped open is collected on the event loop's thread, where it can
    reset a cached statement the connection's thread is stepping ("bad parameter or other
    API misuse", seen under load)."""
    async with db.execute(query, tuple(args)) as cursor:
        return int(cursor.rowcount)


async def run_many(db: aiosqlite.Connection, query: str, rows: Iterable[Iterable[Any]]) -> int:
    """`run` for many rows (executemany); the rows changed in all."""
    async with db.executemany(query, rows) as cursor:
        return int(cursor.rowcount)


def by_id_chunks(select: str, user_ids: Collection[int]) -> Iterator[tuple[str, list[int]]]:
    """`select ... WHERE user_id IN (...)` over `user_ids`, CHUNK ids a statement: each
    statement with its ids."""
    ids = list(user_ids)
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        yield f"{select} WHERE user_id IN ({','.join('?' * len(chunk))})", chunk


async def connect(path: Path, schema: str) -> aiosqlite.Connection:
    """A connection to the file at `path` in WAL mode, with `schema` created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # BEGIN IMMEDIATE for every write: a deferred transaction that reads before it writes
    # fails at once ("database is locked") when the jobs' connection wrote in between,
    # instead of waiting its turn as an immediate one does.
    db = await aiosqlite.connect(path, isolation_level="IMMEDIATE")
    try:
        await wal(db)
        await run(db, "PRAGMA synchronous=NORMAL")
        await db.executescript(schema)
        await db.commit()
    except BaseException:
        await db.close()
        raise
    return db


async def wal(db: aiosqlite.Connection) -> None:
    """Put the file in WAL mode. Leaving a rollback journal needs the file to itself, and
    SQLite's busy timeout does not wait for that: two processes opening a file not yet in
    WAL at once get "database is locked" straight away, so it is tried again, for about
    a second."""
    for attempt in range(WAL_ATTEMPTS):
        try:
            await run(db, "PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == WAL_ATTEMPTS - 1:
                raise
            await asyncio.sleep(0.02)


async def connect_reader(path: Path) -> aiosqlite.Connection:
    """The read connection: its own thread, so reads never queue behind a save on the
    write connection (WAL lets them run beside it); and unable to write."""
    db = await aiosqlite.connect(path)
    try:
        await db.execute_fetchall("PRAGMA query_only=1")
    except BaseException:
        await db.close()
        raise
    return db


def connect_now(path: Path) -> sqlite3.Connection:
    """`read_now`'s connection: as the read connection, but in the stdlib on the caller's
    thread, in autocommit (a read holds no snapshot once fetched) and with a busy timeout
    of 0 (a locked file is left to the threaded read at once)."""
    db = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        db.execute("PRAGMA query_only=1").fetchall()
    except BaseException:
        db.close()
        raise
    return db


async def add_json_column(db: aiosqlite.Connection) -> None:
    """Give a file made before the JSON was kept its column (another process may just
    have done it)."""
    columns = [row[1] for row in await db.execute_fetchall("PRAGMA table_info(users)")]
    if "json" in columns:
        return
    try:
        await db.execute_fetchall(ADD_JSON)
        await db.commit()
    except sqlite3.OperationalError as exc:
        if "duplicate column" not in str(exc):
            raise


def _record(row: Any) -> UserRecord:
    return UserRecord(*row)
