"""A `store` fixture over every store: SQLite (a real file), mongomock, and a real MongoDB."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import mongomock.collection
import pytest
from mongomock_motor import AsyncMongoMockClient
from pymongo import AsyncMongoClient

from app.jobs.mongo import MongoJobStore
from app.jobs.sqlite import SqliteJobStore
from app.jobs.store import JobStore
from app.store import SqliteUserStore, UserStore
from app.store.mongo import MongoUserStore


@pytest.fixture(autouse=True)
def _mongomock_ignores_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    # PyMongo >= 4.11 passes `sort=None` to UpdateOne/ReplaceOne in bulk_write, which
    # mongomock 4.3 does not know (TypeError). The product keeps bulk_write; the test
    # double is taught to ignore the argument. See shared/mongodb-notes.md.
    builder = mongomock.collection.BulkOperationBuilder
    for name in ("add_update", "add_replace"):
        original = getattr(builder, name)

        def without_sort(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            if kwargs.get("sort") is None:
                kwargs.pop("sort", None)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(builder, name, without_sort)


def mongomock_store() -> MongoUserStore:
    """A MongoUserStore over an in-process mongomock client (whose close() is not async)."""
    client: Any = AsyncMongoMockClient(tz_aware=True)
    return MongoUserStore(client, database=f"test_{uuid.uuid4().hex[:8]}", owns_client=False)


@asynccontextmanager
async def mongo_database(kind: str) -> AsyncIterator[tuple[Any, str] | None]:
    """None for `sqlite`; else a client and a fresh database name: mongomock, or the server
    at TEST_MONGODB_URL (skipped without it), whose database is dropped after."""
    database = f"gateway_test_{uuid.uuid4().hex[:8]}"
    if kind == "sqlite":
        yield None
    elif kind == "mongomock":
        yield AsyncMongoMockClient(tz_aware=True), database
    else:
        url = os.environ.get("TEST_MONGODB_URL")
        if not url:
            pytest.skip("TEST_MONGODB_URL not set: no MongoDB server on this machine")
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            url, tz_aware=True, serverSelectionTimeoutMS=3000
        )
        try:
            yield client, database
        finally:
            await client.drop_database(database)
            await client.close()


@pytest.fixture(params=["sqlite", "mongomock", "mongodb"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[UserStore]:
    """Each store, opened, closed after the test."""
    async with mongo_database(request.param) as mongo:
        opened: UserStore = (
            SqliteUserStore(tmp_path / "users.db")
            if mongo is None
            else MongoUserStore(mongo[0], database=mongo[1], owns_client=False)
        )
        await opened.open()
        yield opened
        await opened.close()


@pytest.fixture(params=["sqlite", "mongomock", "mongodb"])
async def job_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    """Each job store, opened, closed after the test."""
    async with mongo_database(request.param) as mongo:
        opened: JobStore = (
            SqliteJobStore(tmp_path / "users.db")
            if mongo is None
            else MongoJobStore(mongo[0], database=mongo[1])
        )
        await opened.open()
        yield opened
        await opened.close()


JobStoreOpener = Callable[[str], Awaitable[JobStore]]


@pytest.fixture(params=["sqlite", "mongomock", "mongodb"])
async def open_job_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[JobStoreOpener]:
    """`await open_job_store(name)` opens a new job store of each kind on the database
    `name`: the same name finds the same data, as a restarted process would."""
    async with mongo_database(request.param) as mongo:
        opened: list[JobStore] = []
        names: set[str] = set()

        async def open_store(name: str) -> JobStore:
            store: JobStore
            if mongo is None:
                store = SqliteJobStore(tmp_path / f"{name}.db")
            else:
                names.add(f"{mongo[1]}_{name}")
                store = MongoJobStore(mongo[0], database=f"{mongo[1]}_{name}")
            await store.open()
            opened.append(store)
            return store

        try:
            yield open_store
        finally:
            for store in opened:
                await store.close()
            if request.param == "mongodb" and mongo is not None:
                for name in names:
                    await mongo[0].drop_database(name)
