"""Shared fixtures: apps built with create_app(test settings), Freelancer faked with respx."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from app.config import Settings
from app.gateway import Gateway
from app.main import create_app

API = "https://api.freelancer.test/api/users/0.1/users"


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings for tests: a temp SQLite file, a fake Freelancer, fast retries, no .env."""
    values: dict[str, Any] = {
        "sqlite_path": tmp_path / "users.db",
        "freelancer_api_base": API,
        "freelancer_oauth_token": "test-token",
        "upstream_rate_per_min": 60_000,
        "upstream_burst": 1000,
        "upstream_backoff_s": 0.01,
        "wait_timeout_s": 5,
        "shutdown_grace_s": 2,
        "upstream_timeout_s": 5,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


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
    """Freelancer's batch endpoint behind respx; records the ids of every call."""

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
    def lookups(self) -> Counter[int]:
        """How many times each id was sent upstream."""
        return Counter(i for call in self.calls for i in call)


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
def freelancer() -> AsyncIterator[FakeFreelancer]:
    fake = FakeFreelancer()
    with respx.mock(assert_all_called=False) as mock:
        mock.get(url__startswith=API).mock(side_effect=fake.handle)
        yield fake


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
async def start_app(tmp_path: Path) -> AsyncIterator[StartApp]:
    """Start apps (lifespan included) with test settings overridden by keyword."""
    async with AsyncExitStack() as stack:

        async def start(*, app: FastAPI | None = None, **overrides: Any) -> Running:
            app = app or create_app(make_settings(tmp_path, **overrides))
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
