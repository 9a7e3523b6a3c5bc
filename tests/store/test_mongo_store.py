"""What only the MongoDB store does: indexes, one round trip per batch, clear failures."""

from __future__ import annotations

import asyncio
import gc
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from app.config import Settings
from app.domain import UserRecord
from app.errors import StoreUnavailable
from app.store import SqliteUserStore, create_store
from app.store.mongo import MongoUserStore
from tests.store.conftest import mongomock_store
from tests.store.raw import save_as_before_the_json


@pytest.fixture
async def refused_sockets_collected() -> AsyncIterator[None]:
    """PyMongo 4.20's async client leaves the socket of a refused connection (to
    127.0.0.1:1 here) unclosed for the GC, its server monitor's last attempt included,
    which may still be under way when close() returns: collect them after each test that
    makes one, over a bounded wait, where they are expected, rather than let one surface
    as an unraisable ResourceWarning in whichever test runs next (it did). Only there: a
    full collection costs about 0.4 s in a process that has run the suite."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        for _ in range(10):
            await asyncio.sleep(0.05)
            gc.collect()


async def test_open_creates_a_unique_index_on_user_id() -> None:
    store = mongomock_store()
    await store.open()
    indexes = await store._users.index_information()
    unique = [i for i in indexes.values() if i["key"] == [("user_id", 1)]]
    assert unique and unique[0].get("unique") is True


async def test_a_batch_is_one_bulk_write_and_one_find(monkeypatch: pytest.MonkeyPatch) -> None:
    store = mongomock_store()
    await store.open()
    calls: list[str] = []
    collection: Any = store._users
    for name in ("bulk_write", "find", "update_one", "find_one"):
        original = getattr(collection, name)

        def counted(*args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            calls.append(_name)
            return _original(*args, **kw)

        monkeypatch.setattr(collection, name, counted)
    now = time.time()
    await store.upsert_many(
        [UserRecord(i, f"u{i}", created_at=now, fetched_at=now) for i in range(100)]
    )
    found = await store.get_many(list(range(100)))
    assert len(found) == 100
    assert calls == ["bulk_write", "find"]


@pytest.mark.usefixtures("refused_sockets_collected")
async def test_an_unreachable_server_fails_in_time_without_showing_the_url() -> None:
    url = "mongodb://admin:hunter2@127.0.0.1:1/?serverSelectionTimeoutMS=200"
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url, tz_aware=True)
    store = MongoUserStore(client, database="x", timeout_s=2)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        await store.open()
    assert time.monotonic() - started < 5
    assert "MONGODB_URL" in str(caught.value)
    assert "hunter2" not in str(caught.value) and "127.0.0.1" not in str(caught.value)
    with pytest.raises(StoreUnavailable):
        await store.get_many([1])
    await store.close()


@pytest.mark.usefixtures("refused_sockets_collected")
async def test_create_store_picks_the_store_from_the_settings(tmp_path: Path) -> None:
    sqlite = create_store(Settings(_env_file=None, sqlite_path=tmp_path / "u.db"))
    assert isinstance(sqlite, SqliteUserStore)
    assert not (tmp_path / "u.db").exists(), "nothing is opened by the factory"
    mongo = create_store(
        Settings(_env_file=None, mongodb_url="mongodb://127.0.0.1:1", database_name="db1")
    )
    assert isinstance(mongo, MongoUserStore)
    assert (mongo.kind, mongo.setting) == ("mongodb", "MONGODB_URL")
    await mongo.close()


async def test_a_hit_is_one_find_that_projects_only_the_json_and_fetched_at(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = mongomock_store()
    await store.open()
    now = float(int(time.time()))
    users = [
        UserRecord(i, f"u{i}", "A Name", "Kenya", created_at=now, fetched_at=now)
        for i in range(100)
    ]
    await store.upsert_many(users)
    await save_as_before_the_json(store, UserRecord(100, "old", created_at=now, fetched_at=now))
    projections: list[dict[str, Any]] = []
    collection: Any = store._users
    original = collection.find

    def find(query: Any, projection: dict[str, Any], *args: Any, **kw: Any) -> Any:
        projections.append(projection)
        return original(query, projection, *args, **kw)

    monkeypatch.setattr(collection, "find", find)
    found = await store.get_rendered(list(range(100)))
    assert found == {u.user_id: (u.rendered(), now) for u in users}
    assert projections == [{"_id": 0, "user_id": 1, "fetched_at": 1, "json": 1}]
    # A document from before the JSON was kept costs one more find, whole.
    old = await store.get_rendered([99, 100])
    assert sorted(old) == [99, 100] and len(projections) == 3
    assert projections[2] == {"_id": 0}
