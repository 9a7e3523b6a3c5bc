"""Apps built with create_app(test settings), running in-process, and what tests wait with."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.coordination.client import connect
from app.coordination.popularity_sync import RedisPopularity
from app.coordination.redis_coordinator import RedisCoordinator
from app.domain import StoredUser, UserRecord
from app.errors import StoreUnavailable
from app.gateway import Gateway
from app.http.state import services_of
from app.jobs.runner import JobRunner
from app.store import SqliteUserStore
from tests.support.freelancer import API


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for tests: a temp SQLite file, a fake Freelancer, fast retries, no .env."""
    values: dict[str, Any] = {
        "sqlite_path": tmp_path / "users.db",
        "freelancer_api_base": API,
        "freelancer_oauth_token": "test-token",
        "upstream_rate_per_min": 60_000,
        "upstream_rate_per_hour": 3_600_000,
        "upstream_burst": 1000,
        "upstream_backoff_s": 0.01,
        "wait_timeout_s": 5,
        "shutdown_grace_s": 2,
        "upstream_timeout_s": 5,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def scrub_settings_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every environment variable that names a setting (case-insensitively).

    TEST_MONGODB_URL names no setting, so it stays: it deliberately enables real-MongoDB tests.
    """
    names = {name.lower() for name in Settings.model_fields}
    for variable in list(os.environ):
        if variable.lower() in names:
            monkeypatch.delenv(variable)


class FlakyStore(SqliteUserStore):
    """A SQLite store for `create_app(store=)` whose first `failing_saves` saves fail, and
    whose reads await `after_read` (when set) before they return what they read."""

    def __init__(self, path: Path, *, failing_saves: int = 0) -> None:
        super().__init__(path)
        self.failing_saves = failing_saves
        self.save_attempts: list[int] = []
        """The size of every `upsert_many` call, failed or not."""
        self.after_read: Callable[[], Awaitable[None]] | None = None

    async def upsert_many(self, users: Sequence[UserRecord]) -> None:
        self.save_attempts.append(len(users))
        if len(self.save_attempts) <= self.failing_saves:
            raise StoreUnavailable("disk full; check SQLITE_PATH")
        await super().upsert_many(users)

    async def get_many(self, user_ids: Collection[int]) -> dict[int, UserRecord]:
        found = await super().get_many(user_ids)
        if self.after_read is not None:
            await self.after_read()
        return found

    def read_now(self, user_ids: Collection[int]) -> dict[int, StoredUser] | None:
        # A read that awaits `after_read` is the threaded one: a read on the loop's thread
        # has no await for a race to come in.
        return None if self.after_read is not None else super().read_now(user_ids)

    async def get_rendered(self, user_ids: Collection[int]) -> dict[int, StoredUser]:
        found = await super().get_rendered(user_ids)
        if self.after_read is not None:
            await self.after_read()
        return found


class GatedReads(SqliteUserStore):
    """A SQLite store whose lookup reads are recorded, wait for `gate` (when set, 10 s at
    most) and fail while `fail` is set: all through the threaded read (no `read_now`)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads: list[list[int]] = []
        self.gate: asyncio.Event | None = None
        self.fail = False

    def read_now(self, user_ids: Collection[int]) -> dict[int, StoredUser] | None:
        return None  # every lookup read goes through `get_rendered`, to be gated

    async def get_rendered(self, user_ids: Collection[int]) -> dict[int, StoredUser]:
        self.reads.append(sorted(user_ids))
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), 10)
        if self.fail:
            raise StoreUnavailable("SQLite store failed: disk I/O error; check SQLITE_PATH")
        return await super().get_rendered(user_ids)


async def until(condition: Callable[[], bool], *, within_s: float = 5.0) -> None:
    """Yield to the event loop until `condition()` holds; fail after `within_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within_s} s")
        await asyncio.sleep(0.001)


@dataclass
class Running:
    """An app with its lifespan running, and a client that talks to it in-process."""

    app: FastAPI
    client: httpx.AsyncClient

    @property
    def gateway(self) -> Gateway:
        gateway = services_of(self.app).gateway
        assert gateway is not None, "the app is not running"
        return gateway

    @property
    def runner(self) -> JobRunner:
        runner = services_of(self.app).runner
        assert runner is not None, "the app is not running"
        return runner

    async def lookup(self, *ids: int) -> dict[str, Any]:
        response = await self.client.post("/api/users", json={"user_ids": list(ids)})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


StartApp = Callable[..., Awaitable[Running]]


def redis_gateway(
    tmp_path: Path,
    redis_url: str,
    *,
    upstream: Any,
    clock: Callable[[], float],
    timeout_s: float = 1.0,
    **overrides: Any,
) -> Gateway:
    """A gateway on `tmp_path`'s SQLite file, coordinated and sharing its popularity
    through the Redis at `redis_url` (prefix "t", a 2 s lease), as one process of a
    deployment: several of them in one test are separate processes to Redis."""
    coordinator = RedisCoordinator(
        connect(redis_url, timeout_s), prefix="t", lease_s=2.0, timeout_s=timeout_s
    )
    share = RedisPopularity(
        coordinator.redis,
        prefix="t",
        process=coordinator.process,
        timeout_s=timeout_s,
        leads=coordinator.leads,
    )
    return Gateway(
        settings=make_settings(tmp_path, **overrides),
        store=SqliteUserStore(tmp_path / "users.db"),
        upstream=upstream,
        coordinator=coordinator,
        popularity=share,
        clock=clock,
    )
