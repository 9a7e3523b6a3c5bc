"""The job store's frequent reads go through an index: the due callbacks (polled each
second) and a job's next pending ids (read for every chunk), on SQLite and MongoDB."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.jobs import sqlite
from app.jobs.model import FOUND, PENDING, Item, Job
from app.jobs.mongo import PENDING_INDEX, MongoJobStore, due_webhooks
from app.jobs.sqlite import SqliteJobStore
from tests.store.conftest import mongo_database

NOW = 1_700_000_000.0


async def sqlite_plan(store: SqliteJobStore, query: str, args: tuple[Any, ...]) -> str:
    assert store._db is not None
    rows = await store._db.execute_fetchall(f"EXPLAIN QUERY PLAN {query}", args)
    return " | ".join(str(row[3]) for row in rows)


async def sqlite_store_with_history(folder: Path) -> SqliteJobStore:
    """A store holding a job with 3 000 finished ids and 10 pending, 300 finished jobs
    whose callbacks are done, and statistics for the planner (ANALYZE), as a busy
    gateway's file would."""
    store = SqliteJobStore(folder / "jobs.db")
    await store.open()
    await store.create(Job("big", "running", "normal", 3010, 3010), range(1, 3011))
    done = [Item(seq, seq + 1, FOUND) for seq in range(3000)]
    await store.record("big", done, upstream_calls=30, now=NOW)
    for n in range(300):
        job = Job(f"old{n:03}", "completed", "normal", 1, 1, webhook="delivered")
        await store.create(job, [n + 1])
    assert store._db is not None
    await store._db.execute("ANALYZE")
    return store


async def test_sqlite_reads_pending_ids_through_the_state_index(tmp_path: Path) -> None:
    store = await sqlite_store_with_history(tmp_path)
    try:
        plan = await sqlite_plan(store, sqlite.PENDING_ITEMS, ("big", PENDING, -1, 100))
        assert "INDEX job_items_state (job_id=? AND state=? AND seq>?)" in plan, plan
        pending = await store.pending_items("big", after=-1, limit=100)
        assert [i.seq for i in pending] == list(range(3000, 3010))
    finally:
        await store.close()


async def test_sqlite_finds_due_callbacks_through_their_own_index(tmp_path: Path) -> None:
    store = await sqlite_store_with_history(tmp_path)
    try:
        plan = await sqlite_plan(store, sqlite.DUE_WEBHOOKS, (NOW, 20))
        assert "INDEX jobs_webhook_due" in plan, plan
        assert "SCAN jobs" not in plan, plan
    finally:
        await store.close()


def index_names(plan: Any) -> Iterator[str]:
    """Every `indexName` in an explain() answer, however deep."""
    if isinstance(plan, dict):
        for key, value in plan.items():
            if key == "indexName":
                yield str(value)
            else:
                yield from index_names(value)
    elif isinstance(plan, list):
        for value in plan:
            yield from index_names(value)


@pytest.mark.parametrize("kind", ["mongomock", "mongodb"])
async def test_mongodb_has_an_index_for_due_callbacks_and_pending_ids(kind: str) -> None:
    async with mongo_database(kind) as mongo:
        assert mongo is not None
        store = MongoJobStore(mongo[0], database=mongo[1])
        await store.open()
        indexes = await store._jobs.index_information()
        due = indexes["webhook_due"]
        assert due["key"] == [("webhook_next_at", 1)]
        assert due["partialFilterExpression"] == {"webhook": "pending"}
        items = await store._items.index_information()
        assert PENDING_INDEX in [index["key"] for index in items.values()]
        if kind == "mongodb":  # only a real server has a query planner to ask
            await store.create(Job("big", "running", "normal", 300, 300), range(1, 301))
            done = [Item(seq, seq + 1, FOUND) for seq in range(290)]
            await store.record("big", done, upstream_calls=3, now=NOW)
            plan = await store._jobs.find(due_webhooks(NOW)).explain()
            assert "webhook_due" in set(index_names(plan["queryPlanner"]["winningPlan"]))
            plan = await store._item_cursor("big", -1, 100, (PENDING,)).explain()
            used = set(index_names(plan["queryPlanner"]["winningPlan"]))
            assert used == {"job_id_1_state_1_seq_1"}, used
