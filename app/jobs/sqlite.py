"""Jobs in the SQLite file beside the users: a `jobs` table and a `job_items` table.

Every operation is one transaction, but one: `delete` hides the job (status `deleting`)
in one, then removes its ids in bounded chunks, one transaction each (one DELETE of a
big job's ids would pass STORE_TIMEOUT_S and roll back), the job last; `sweep` finishes
what a crash or the time bound left.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from app.errors import JobConflict
from app.jobs.model import (
    ACTIVE,
    DELETING,
    FAILED,
    FINISHED,
    HIDDEN,
    ITEM_STATES,
    JOB_FIELDS,
    PENDING,
    Item,
    Job,
    check_fields,
)
from app.store.sqlite import connect, failures, guard, run, run_many

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    priority TEXT NOT NULL,
    total INTEGER NOT NULL,
    materialised INTEGER NOT NULL,
    range_first INTEGER,
    label TEXT,
    owner TEXT,
    max_age_s REAL NOT NULL,
    callback_url TEXT,
    done INTEGER NOT NULL,
    found INTEGER NOT NULL,
    not_found INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    upstream_calls INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    updated_at REAL NOT NULL,
    finished_at REAL,
    error TEXT,
    webhook TEXT,
    webhook_attempts INTEGER NOT NULL,
    webhook_error TEXT,
    webhook_next_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, job_id);
-- Only jobs whose callback waits are in it: the poll each second reads a few rows, not
-- every job ever run.
CREATE INDEX IF NOT EXISTS jobs_webhook_due ON jobs (webhook_next_at) WHERE webhook = 'pending';
CREATE TABLE IF NOT EXISTS job_items (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    user_id INTEGER NOT NULL,
    state INTEGER NOT NULL,
    reason TEXT,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS job_items_state ON job_items (job_id, state, seq);
"""
SELECT = f"SELECT {', '.join(JOB_FIELDS)} FROM jobs"
VISIBLE = f"status NOT IN ({', '.join(repr(s) for s in HIDDEN)})"
ACTIVE_SQL = f"status IN ({', '.join(repr(s) for s in ACTIVE)})"
# Named index: the planner would otherwise walk the primary key (job_id, seq) through
# every finished id before the pending ones.
PENDING_ITEMS = (
    "SELECT seq, user_id, state, reason FROM job_items INDEXED BY job_items_state "
    "WHERE job_id = ? AND state = ? AND seq > ? ORDER BY seq LIMIT ?"
)
# The literal 'pending' matches the partial index jobs_webhook_due.
DUE_WEBHOOKS = (
    f"{SELECT} WHERE webhook = 'pending' AND webhook_next_at <= ? ORDER BY webhook_next_at LIMIT ?"
)
DELETE_CHUNK = 5_000
"""Items removed per transaction: each stays far inside STORE_TIMEOUT_S."""
INSERT_JOB = (
    f"INSERT INTO jobs ({', '.join(JOB_FIELDS)}) VALUES ({', '.join('?' for _ in JOB_FIELDS)})"
)
INSERT_ITEM = "INSERT OR IGNORE INTO job_items (job_id, seq, user_id, state) VALUES (?, ?, ?, 0)"


class SqliteJobStore:
    """Jobs in the SQLite file at SQLITE_PATH, on a connection of their own (WAL lets the
    users' connection read and write beside it)."""

    def __init__(self, path: Path, *, timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.purge_s = timeout_s
        """How long one delete or sweep goes on removing ids; the next sweep goes on."""
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        if self._db is None:
            async with failures(self.path, self.timeout_s):
                self._db = await connect(self.path, SCHEMA)

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    def _guard(self) -> AbstractAsyncContextManager[aiosqlite.Connection]:
        return guard(self._db, self.path, self.timeout_s)

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction at a time on this connection, committed whole or rolled
        back whole (coroutines share the connection; their statements must not mix)."""
        async with self._lock, self._guard() as db:
            try:
                yield db
                await db.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.shield(db.rollback())
                raise

    async def create(self, job: Job, user_ids: Sequence[int]) -> None:
        row = tuple(job.as_dict().values())
        async with self._write() as db:
            await run(db, INSERT_JOB, row)
            await run_many(
                db, INSERT_ITEM, ((job.job_id, seq, uid) for seq, uid in enumerate(user_ids))
            )

    async def get(self, job_id: str) -> Job | None:
        async with self._guard() as db:
            query = f"{SELECT} WHERE job_id = ? AND {VISIBLE}"
            rows = list(await db.execute_fetchall(query, (job_id,)))
        return Job(*rows[0]) if rows else None

    async def status(self, job_id: str) -> str | None:
        async with self._guard() as db:
            query = f"SELECT status FROM jobs WHERE job_id = ? AND {VISIBLE}"
            rows = list(await db.execute_fetchall(query, (job_id,)))
        return str(rows[0][0]) if rows else None

    async def list_jobs(self, *, status: str | None, limit: int, before: str | None) -> list[Job]:
        where, args = _where(status=status, before=before)
        where = f"{where} AND {VISIBLE}" if where else f" WHERE {VISIBLE}"
        query = f"{SELECT}{where} ORDER BY job_id DESC LIMIT ?"
        async with self._guard() as db:
            return [Job(*row) for row in await db.execute_fetchall(query, (*args, limit))]

    async def active(self) -> list[Job]:
        query = f"{SELECT} WHERE status IN (?, ?) ORDER BY job_id"
        async with self._guard() as db:
            return [Job(*row) for row in await db.execute_fetchall(query, ACTIVE)]

    async def update(
        self,
        job_id: str,
        changes: Mapping[str, Any],
        *,
        only_if: Collection[str] = (),
        expect: Mapping[str, Any] | None = None,
    ) -> bool:
        check_fields({**changes, **(expect or {})})
        sets = ", ".join(f"{name} = ?" for name in changes)
        query = f"UPDATE jobs SET {sets} WHERE job_id = ? AND {VISIBLE}"
        args = [*changes.values(), job_id]
        if only_if:
            query += f" AND status IN ({', '.join('?' for _ in only_if)})"
            args += list(only_if)
        for name, value in (expect or {}).items():
            query += f" AND {name} IS ?"  # IS: NULL matches NULL
            args.append(value)
        async with self._write() as db:
            rows_changed = await run(db, query, args)
        return rows_changed > 0

    async def complete(self, job_id: str, changes: Mapping[str, Any]) -> bool:
        check_fields(changes)
        sets = ", ".join(f"{name} = ?" for name in changes)
        query = (
            f"UPDATE jobs SET {sets} WHERE job_id = ? AND {ACTIVE_SQL} "
            "AND materialised >= total AND NOT EXISTS (SELECT 1 FROM job_items "
            "INDEXED BY job_items_state WHERE job_id = ? AND state = 0)"
        )
        async with self._write() as db:
            rows_changed = await run(db, query, (*changes.values(), job_id, job_id))
        return rows_changed > 0

    async def materialise(self, job_id: str, first_seq: int, user_ids: Sequence[int]) -> None:
        async with self._write() as db:
            rows_changed = await run(
                db,
                "UPDATE jobs SET materialised = MAX(materialised, ?) "
                f"WHERE job_id = ? AND {ACTIVE_SQL}",
                (first_seq + len(user_ids), job_id),
            )
            if rows_changed == 0:
                return  # stopped, deleted or gone: its ids would be left behind
            await run_many(
                db, INSERT_ITEM, ((job_id, first_seq + i, uid) for i, uid in enumerate(user_ids))
            )

    async def pending_items(self, job_id: str, *, after: int, limit: int) -> list[Item]:
        async with self._guard() as db:
            rows = await db.execute_fetchall(PENDING_ITEMS, (job_id, PENDING, after, limit))
        return [Item(*row) for row in rows]

    async def record(
        self, job_id: str, items: Sequence[Item], *, upstream_calls: int, now: float
    ) -> None:
        by_state: dict[int, list[tuple[int, str | None, str, int]]] = defaultdict(list)
        for item in items:
            by_state[item.state].append((item.state, item.reason, job_id, item.seq))
        changed: dict[str, int] = {}
        async with self._write() as db:
            for state, rows in by_state.items():
                rows_changed = await run_many(
                    db,
                    "UPDATE job_items SET state = ?, reason = ? "
                    "WHERE job_id = ? AND seq = ? AND state = 0",
                    rows,
                )
                changed[ITEM_STATES[state]] = rows_changed
            await run(
                db,
                "UPDATE jobs SET found = found + ?, not_found = not_found + ?, "
                "failed = failed + ?, done = done + ?, upstream_calls = upstream_calls + ?, "
                "updated_at = ? WHERE job_id = ?",
                (
                    changed.get("found", 0),
                    changed.get("not_found", 0),
                    changed.get("failed", 0),
                    sum(changed.values()),
                    upstream_calls,
                    now,
                    job_id,
                ),
            )

    async def items(
        self, job_id: str, *, after: int, limit: int, states: Collection[int]
    ) -> list[Item]:
        marks = ", ".join("?" for _ in states)
        query = (
            "SELECT seq, user_id, state, reason FROM job_items "
            f"WHERE job_id = ? AND seq > ? AND state IN ({marks}) ORDER BY seq LIMIT ?"
        )
        async with self._guard() as db:
            rows = await db.execute_fetchall(query, (job_id, after, *states, limit))
        return [Item(*row) for row in rows]

    async def retry_failed(self, job_id: str, now: float) -> int:
        async with self._write() as db:
            # The job first, and only from a finished state: on a job still running, its
            # failed ids stay failed (they are counted so).
            rows_changed = await run(
                db,
                "UPDATE jobs SET status = 'pending', finished_at = NULL, error = NULL, "
                "updated_at = ?, webhook = NULL, webhook_attempts = 0, webhook_error = NULL, "
                f"webhook_next_at = NULL WHERE job_id = ? AND status IN "
                f"({', '.join('?' for _ in FINISHED)})",
                (now, job_id, *FINISHED),
            )
            if rows_changed == 0:
                raise JobConflict(f"job {job_id} is not finished: retry-failed waits until it is")
            rows_changed = await run(
                db,
                "UPDATE job_items SET state = 0, reason = NULL WHERE job_id = ? AND state = ?",
                (job_id, FAILED),
            )
            count = rows_changed
            await run(
                db,
                "UPDATE jobs SET failed = failed - ?, done = done - ? WHERE job_id = ?",
                (count, count, job_id),
            )
        return count

    async def delete(self, job_id: str) -> bool:
        deadline = self._deadline()
        async with self._write() as db:
            rows_changed = await run(
                db,
                "UPDATE jobs SET status = ?, webhook = NULL, webhook_next_at = NULL "
                f"WHERE job_id = ? AND {VISIBLE}",
                (DELETING, job_id),
            )
        await self._purge(job_id, deadline)
        return rows_changed > 0

    async def sweep(self) -> None:
        deadline = self._deadline()
        async with self._guard() as db:
            query = "SELECT job_id FROM jobs WHERE status = ? LIMIT 100"
            rows = await db.execute_fetchall(query, (DELETING,))
        for (job_id,) in rows:
            await self._purge(job_id, deadline)
            if asyncio.get_running_loop().time() >= deadline:
                return

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.purge_s

    async def _purge(self, job_id: str, deadline: float) -> None:
        """Remove a hidden job's items a chunk per transaction, then the job; what is left
        at `deadline` (past at least one chunk) waits for the next sweep."""
        while True:
            async with self._write() as db:
                rows_changed = await run(
                    db,
                    "DELETE FROM job_items WHERE job_id = ? AND seq IN "
                    "(SELECT seq FROM job_items WHERE job_id = ? ORDER BY seq LIMIT ?)",
                    (job_id, job_id, DELETE_CHUNK),
                )
                if rows_changed < DELETE_CHUNK:
                    await run(
                        db, "DELETE FROM jobs WHERE job_id = ? AND status = ?", (job_id, DELETING)
                    )
                    return
            if asyncio.get_running_loop().time() >= deadline:
                return

    async def count_by_status(self) -> dict[str, int]:
        query = f"SELECT status, COUNT(*) FROM jobs WHERE {VISIBLE} GROUP BY status"
        async with self._guard() as db:
            return {status: count for status, count in await db.execute_fetchall(query)}

    async def webhooks_due(self, now: float, limit: int) -> list[Job]:
        async with self._guard() as db:
            return [Job(*row) for row in await db.execute_fetchall(DUE_WEBHOOKS, (now, limit))]


def _where(*, status: str | None, before: str | None) -> tuple[str, list[Any]]:
    clauses, args = [], []
    if status is not None:
        clauses.append("status = ?")
        args.append(status)
    if before is not None:
        clauses.append("job_id < ?")
        args.append(before)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args
