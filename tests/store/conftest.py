"""A `store` fixture over every store: SQLite (a real file), mongomock, and a real MongoDB."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator
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


class JobStores:
    """Job stores of one kind: `await stores.open(name)` opens a new one on the database
    `name` (the same name finds the same data, as a restarted process would); their clock
    is `stores.now`, moved on with `stores.advance(seconds)`."""

    def __init__(self, kind: str, mongo: tuple[Any, str] | None, folder: Path) -> None:
        self.kind = kind
        self.now = time.time()
        self.opened: list[JobStore] = []
        self.databases: set[str] = set()
        self._mongo = mongo
        self._folder = folder

    def clock(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def open(self, name: str) -> JobStore:
        store: JobStore
        if self._mongo is None:
            store = SqliteJobStore(self._folder / f"{name}.db")
        else:
            database = f"{self._mongo[1]}_{name}"
            self.databases.add(database)
            store = MongoJobStore(self._mongo[0], database=database, clock=self.clock)
        await store.open()
        self.opened.append(store)
        return store


@pytest.fixture(params=["sqlite", "mongomock", "mongodb"])
async def job_stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStores]:
    """Job stores of each kind, all closed (and real MongoDB databases dropped) after."""
    async with mongo_database(request.param) as mongo:
        stores = JobStores(request.param, mongo, tmp_path)
        try:
            yield stores
        finally:
            for store in stores.opened:
                await store.close()
            if request.param == "mongodb" and mongo is not None:
                for database in stores.databases:
                    await mongo[0].drop_database(database)
