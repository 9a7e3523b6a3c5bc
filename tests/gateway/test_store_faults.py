"""The store failing: at start, on reads, on saves. Nothing fetched is lost."""

from __future__ import annotations

from pathlib import Path

from tests.support.apps import FlakyStore, StartApp, until
from tests.support.freelancer import FakeFreelancer


async def test_an_unreachable_store_at_start_is_reported_and_recovers_without_restart(
    start_app: StartApp, freelancer: FakeFreelancer, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's folder should be")
    running = await start_app(sqlite_path=blocker / "users.db")
    health = (await running.client.get("/")).json()
    assert health["status"] == "degraded"
    assert any("SQLITE_PATH" in p for p in health["problems"])
    ready = await running.client.get("/readyz")
    assert ready.status_code == 503
    assert "SQLITE_PATH" in ready.json()["detail"]
    lookup = await running.client.post("/api/users", json={"user_ids": [1]})
    assert lookup.status_code == 503
    assert lookup.json()["error"] == "store_unavailable"
    assert "SQLITE_PATH" in lookup.json()["detail"]
    assert freelancer.calls == [], "no upstream call while the store cannot be read"

    blocker.unlink()  # the operator fixes the path; the gateway reconnects by itself
    await until(lambda: running.gateway.writes.store_ready, within_s=10)
    assert (await running.client.get("/readyz")).status_code == 200
    assert (await running.lookup(1))["users"][0]["user_id"] == 1


async def test_a_failing_save_still_answers_the_waiters_and_is_retried(
    start_app: StartApp, freelancer: FakeFreelancer, tmp_path: Path
) -> None:
    store = FlakyStore(tmp_path / "users.db", failing_saves=2)
    running = await start_app(store_save_attempts=2, store=store)
    body = await running.lookup(1, 2)
    assert [u["user_id"] for u in body["users"]] == [1, 2], "the fetched data is not lost"
    assert await running.gateway.wait_idle(5)
    assert store.save_attempts == [2, 2]
    assert await store.get_many([1, 2]) == {}
    stats = (await running.client.get("/api/stats")).json()
    assert stats["store_save_failures"] == 2
    # The next batch saves what the failed one left, too.
    await running.lookup(3)
    assert await running.gateway.wait_idle(5)
    assert sorted(await store.get_many([1, 2, 3])) == [1, 2, 3]
    assert store.save_attempts[-1] == 3
