"""The store failing: at start, on reads, on saves. Nothing fetched is lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from app.domain import UserRecord
from app.errors import StoreUnavailable
from app.gateway import write_behind
from app.gateway.stats import GatewayStats
from app.gateway.write_behind import SAVE_MAX_USERS, WriteBehind
from app.store import SqliteUserStore
from tests.support.apps import FlakyStore, StartApp, make_settings, until
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


async def test_saves_made_together_take_turns_and_lose_nothing(tmp_path: Path) -> None:
    """Twenty batches' saves arriving while one is under way: one transaction at a time on
    the store's writer, the waiting ones written together, every user stored."""
    store = SqliteUserStore(tmp_path / "users.db")
    await store.open()
    writes = WriteBehind(store, stats=GatewayStats(), settings=make_settings(tmp_path))
    gate = asyncio.Event()
    upsert = store.upsert_many
    sizes: list[int] = []

    async def held_up(users: Sequence[UserRecord]) -> None:
        sizes.append(len(users))
        await gate.wait()
        await upsert(users)

    store.upsert_many = held_up  # type: ignore[method-assign]
    now = time.time()
    saves = [
        asyncio.create_task(writes.save([UserRecord(i, f"u{i}", fetched_at=now)]))
        for i in range(1, 21)
    ]
    await until(lambda: len(sizes) == 1)
    assert writes.holding and writes.held(20) is not None, "waiting users are held"
    gate.set()
    await asyncio.gather(*saves)
    assert sizes == [1, 19], "the first alone, then the rest in one"
    assert set(await store.get_many(range(1, 21))) == set(range(1, 21))
    assert not writes.holding
    await store.close()


async def test_a_backlog_is_saved_in_bounded_transactions_oldest_first(tmp_path: Path) -> None:
    """2 500 users waiting while a save is held up are written SAVE_MAX_USERS at a time,
    oldest first, not as one transaction that grows with the backlog (24 000 users in one
    upsert timed out again and again in `make bench`'s warm-up)."""
    store = SqliteUserStore(tmp_path / "users.db")
    await store.open()
    writes = WriteBehind(store, stats=GatewayStats(), settings=make_settings(tmp_path))
    gate = asyncio.Event()
    upsert = store.upsert_many
    batches: list[list[int]] = []

    async def held_up(users: Sequence[UserRecord]) -> None:
        batches.append([user.user_id for user in users])
        await gate.wait()
        await upsert(users)

    store.upsert_many = held_up  # type: ignore[method-assign]
    now = time.time()
    first = asyncio.create_task(writes.save([UserRecord(0, "u0", fetched_at=now)]))
    await until(lambda: len(batches) == 1)
    backlog = [
        asyncio.create_task(
            writes.save([UserRecord(i, f"u{i}", fetched_at=now) for i in range(b, b + 100)])
        )
        for b in range(1, 2501, 100)
    ]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(first, *backlog)
    assert [len(batch) for batch in batches] == [1, SAVE_MAX_USERS, SAVE_MAX_USERS, 500]
    assert [uid for batch in batches for uid in batch] == list(range(2501)), "oldest first"
    assert len(await store.get_many(range(2501))) == 2501
    assert not writes.holding
    await store.close()


async def test_a_failing_chunk_stops_the_turn_and_nothing_is_lost(tmp_path: Path) -> None:
    """The store failing halfway through a backlog: the chunk that failed and the rest stay
    held (the lookups still read them), and the next save writes them all."""
    store = FlakyStore(tmp_path / "users.db", failing_saves=1)
    await store.open()
    writes = WriteBehind(
        store, stats=GatewayStats(), settings=make_settings(tmp_path, store_save_attempts=1)
    )
    now = time.time()
    await writes.save([UserRecord(i, f"u{i}", fetched_at=now) for i in range(1, 1501)])
    assert store.save_attempts == [SAVE_MAX_USERS], "one failed try, then the turn ends"
    assert all(writes.held(i) is not None for i in range(1, 1501)), "nothing dropped"
    await writes.save([])
    assert len(await store.get_many(range(1, 1501))) == 1500
    assert not writes.holding
    await store.close()


async def test_while_the_store_is_down_the_unsaved_users_stay_bounded(tmp_path: Path) -> None:
    """Saves failing while users keep coming: write-behind holds the newest
    MEMORY_CACHE_SIZE of them, not every user fetched while the store is down (chunked
    saves trimmed only the chunk that failed, and the rest of the buffer grew)."""
    store = FlakyStore(tmp_path / "users.db", failing_saves=10**6)
    await store.open()
    settings = make_settings(tmp_path, store_save_attempts=1, memory_cache_size=1000)
    writes = WriteBehind(store, stats=GatewayStats(), settings=settings)
    now = time.time()
    for start in range(1, 3001, 500):
        await writes.save(
            [UserRecord(i, f"u{i}", fetched_at=now) for i in range(start, start + 500)]
        )
    held = [uid for uid in range(1, 3001) if writes.held(uid) is not None]
    assert held == list(range(2001, 3001)), "the newest 1 000, no more"
    await store.close()


class GatedSaves(FlakyStore):
    """A SQLite store whose saves wait for `gate` (10 s at most)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()

    async def upsert_many(self, users: Sequence[UserRecord]) -> None:
        await asyncio.wait_for(self.gate.wait(), 10)
        await super().upsert_many(users)


async def test_fetching_waits_while_the_store_falls_behind_and_loses_nothing(
    start_app: StartApp,
    freelancer: FakeFreelancer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past SAVE_BACKLOG_MAX unsaved users the worker makes no new call until the store
    catches up (fetching faster than the store saves grew the process without bound);
    then every lookup is answered and every user stored."""
    monkeypatch.setattr(write_behind, "SAVE_BACKLOG_MAX", 150)
    store = GatedSaves(tmp_path / "users.db")
    running = await start_app(
        store=store,
        upstream_concurrency=1,
        wait_timeout_s=20,
        key_misses_per_min=10_000,
        store_timeout_s=30,  # the worker's wait outlasts any stall of a loaded machine
    )
    lookups = [
        asyncio.create_task(running.lookup(*range(first, first + 100)))
        for first in range(1, 601, 100)
    ]
    await until(lambda: running.gateway.writes.backlog >= 150)
    calls = len(freelancer.calls)
    assert calls < 6
    await asyncio.sleep(0.5)  # a bounded look: nothing more is fetched while saves wait
    assert len(freelancer.calls) == calls, "fetched on while the store fell behind"
    metrics = (await running.client.get("/metrics")).text
    assert f"gateway_store_unsaved {float(running.gateway.writes.backlog)}" in metrics
    store.gate.set()
    bodies = await asyncio.wait_for(asyncio.gather(*lookups), 20)
    assert [len(body["users"]) for body in bodies] == [100] * 6
    assert len(freelancer.calls) == 6
    assert await running.gateway.wait_idle(10)
    assert await store.count() == 600
    assert running.gateway.writes.backlog == 0


async def test_fetching_goes_on_while_the_store_is_down(
    start_app: StartApp,
    freelancer: FakeFreelancer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the store down the backlog is held to MEMORY_CACHE_SIZE instead: waiting for
    saves that fail would stop every miss."""
    monkeypatch.setattr(write_behind, "SAVE_BACKLOG_MAX", 150)
    store = FlakyStore(tmp_path / "users.db", failing_saves=1000)
    running = await start_app(
        store=store, upstream_concurrency=1, store_save_attempts=1, key_misses_per_min=10_000
    )
    bodies = await asyncio.wait_for(
        asyncio.gather(*(running.lookup(*range(f, f + 100)) for f in range(1, 601, 100))), 20
    )
    assert [len(body["users"]) for body in bodies] == [100] * 6
    assert len(freelancer.calls) == 6


async def test_a_worker_waiting_for_saves_fetches_on_once_a_read_finds_the_store_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`room` waits while the store is up and behind; a read that finds the store down
    ends the wait at once (not after STORE_TIMEOUT_S): saves that fail would never catch up."""
    monkeypatch.setattr(write_behind, "SAVE_BACKLOG_MAX", 10)
    store = GatedSaves(tmp_path / "users.db")
    writes = WriteBehind(store, stats=GatewayStats(), settings=make_settings(tmp_path))
    assert await writes.open()
    now = time.time()
    saving = asyncio.create_task(
        writes.save([UserRecord(i, f"u{i}", fetched_at=now) for i in range(20)])
    )
    await until(lambda: writes.backlog == 20)
    waiting = asyncio.create_task(writes.room())
    await asyncio.sleep(0.2)  # a bounded look: it waits while the store is up
    assert not waiting.done()
    await store.close()  # the next read fails: the store is down
    with pytest.raises(StoreUnavailable):
        await writes.read([1])
    await asyncio.wait_for(waiting, 1)  # well within STORE_TIMEOUT_S (5 s)
    saving.cancel()
