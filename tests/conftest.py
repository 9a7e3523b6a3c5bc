"""Shared fixtures: apps built with create_app(test settings), Freelancer faked through the
app's upstream transport, and a test environment free of the shell's settings."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from app.clock import Clock, wall_clock
from app.config import Settings
from app.domain import StoredUser, UserRecord
from app.errors import StoreUnavailable
from app.gateway import Gateway
from app.main import create_app
from app.store import SqliteUserStore, UserStore
from bench.procs import RedisServer

API = "https://api.freelancer.test/api/users/0.1/users"


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


@pytest.fixture(autouse=True)
def _isolated_from_the_shell(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the shell's settings: not its environment, not a `.env` file.

    The environment is scrubbed (child processes inherit os.environ, so they are covered
    too), the working directory is an empty temp folder (so no `.env` is found, here or in
    a child process), and `Settings` is told not to read one anyway.
    """
    scrub_settings_environment(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(Settings.model_config, "env_file", None)


def freelancer_user(user_id: int) -> dict[str, Any]:
    """A user object shaped like Freelancer's."""
    return {
        "id": user_id,
        "username": f"user{user_id}",
        "display_name": f"User {user_id}",
        "role": "freelancer",
        "registration_date": 1_500_000_000 + user_id,
        "avatar_cdn": f"//cdn.test/{user_id}.jpg",
        "location": {"country": {"name": "Australia", "code": "au"}, "city": "Sydney"},
    }


@dataclass
class FakeFreelancer:
    """Freelancer's users API, served by `transport`; records the ids of every call."""

    calls: list[list[int]] = field(default_factory=list)
    missing: set[int] = field(default_factory=set)
    latency_s: float = 0.0
    gate: asyncio.Event | None = None
    failures: list[httpx.Response | Exception] = field(default_factory=list)
    """Answers served (or exceptions raised), in order, before the normal ones."""
    always: httpx.Response | None = None
    """When set, every call gets this answer."""

    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the first call has arrived."""

    async def handle(self, request: httpx.Request) -> httpx.Response:
        ids = [int(v) for k, v in request.url.params.multi_items() if k == "users[]"]
        self.calls.append(ids)
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return failure
        if self.always is not None:
            return self.always
        users = {str(i): freelancer_user(i) for i in ids if i not in self.missing}
        return httpx.Response(
            200, json={"status": "success", "result": {"users": users}, "request_id": "t"}
        )

    @property
    def transport(self) -> httpx.MockTransport:
        """An httpx transport answering with `handle`, for `create_app(upstream_transport=)`."""
        return httpx.MockTransport(self.handle)

    @property
    def lookups(self) -> Counter[int]:
        """How many times each id was sent upstream."""
        return Counter(i for call in self.calls for i in call)


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

    async def get_rendered(self, user_ids: Collection[int]) -> dict[int, StoredUser]:
        found = await super().get_rendered(user_ids)
        if self.after_read is not None:
            await self.after_read()
        return found


async def until(condition: Callable[[], bool], *, within_s: float = 5.0) -> None:
    """Yield to the event loop until `condition()` holds; fail after `within_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within_s} s")
        await asyncio.sleep(0.001)


def error_response(status: int, *, headers: dict[str, str] | None = None) -> httpx.Response:
    """An error answer in Freelancer's format."""
    body = {"status": "error", "message": f"error {status}", "error_code": "X", "request_id": "t"}
    return httpx.Response(status, json=body, headers=headers)


@pytest.fixture
def freelancer() -> FakeFreelancer:
    """A fake Freelancer; apps from `start_app` in the same test call it."""
    return FakeFreelancer()


@dataclass
class Running:
    """An app with its lifespan running, and a client that talks to it in-process."""

    app: FastAPI
    client: httpx.AsyncClient

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.app.state.gateway
        return gateway

    async def lookup(self, *ids: int) -> dict[str, Any]:
        response = await self.client.post("/api/users", json={"user_ids": list(ids)})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


StartApp = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StartApp]:
    """Start apps (lifespan included) with test settings overridden by keyword.

    `store=` replaces the configured store, `clock=` the wall clock (a `FakeClock` to step
    freshness); `app=` starts an app built by the test. When the test uses the
    `freelancer` fixture, the apps built here call it.
    """
    fake: FakeFreelancer | None = None
    if "freelancer" in request.fixturenames:
        fake = request.getfixturevalue("freelancer")
    async with AsyncExitStack() as stack:

        async def start(
            *,
            app: FastAPI | None = None,
            store: UserStore | None = None,
            clock: Clock = wall_clock,
            **overrides: Any,
        ) -> Running:
            app = app or create_app(
                make_settings(tmp_path, **overrides),
                store=store,
                upstream_transport=fake.transport if fake is not None else None,
                clock=clock,
            )
            manager = await stack.enter_async_context(
                LifespanManager(app, startup_timeout=10, shutdown_timeout=30)
            )
            client = await stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=manager.app), base_url="http://gateway.test"
                )
            )
            return Running(app, client)

        yield start


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port (skipped, saying why, if not installed)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it when run as root)")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
