"""The whole gateway on the MongoDB store (mongomock stands in for the server)."""

from __future__ import annotations

from pathlib import Path

from tests.store.conftest import mongomock_store
from tests.support.apps import StartApp
from tests.support.freelancer import FakeFreelancer


async def test_the_gateway_caches_users_in_mongodb(
    start_app: StartApp, freelancer: FakeFreelancer, tmp_path: Path
) -> None:
    store = mongomock_store()
    running = await start_app(store=store)
    assert (await running.client.get("/")).json()["store"] == "mongodb"
    body = await running.lookup(1, 2)
    assert [u["user_id"] for u in body["users"]] == [1, 2]
    assert await running.gateway.wait_idle(5)
    stored = await store.get_many([1, 2])
    assert stored[1].username == "user1"
    stats = (await running.client.get("/api/stats")).json()
    assert (stats["store"], stats["total_users_cached"]) == ("mongodb", 2)
    assert not (tmp_path / "users.db").exists(), "the SQLite file is not touched"
