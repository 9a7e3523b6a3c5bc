"""Shared fixtures: apps built with create_app(test settings), Freelancer faked through the
app's upstream transport, and a test environment free of the shell's settings."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from app.clock import Clock, wall_clock
from app.config import Settings
from app.jobs import runner as job_runner
from app.jobs import webhook as job_webhook
from app.main import create_app
from app.store import UserStore
from tests.support.apps import Running, StartApp, make_settings, scrub_settings_environment
from tests.support.freelancer import FakeFreelancer
from tests.support.procs import RedisServer


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with the slow layers it uses, so `make test-fast` can leave them out:
    `redis` and `browser` by the fixtures it asks for, `fuzz` for Hypothesis tests."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "redis_server" in fixtures:
            item.add_marker(pytest.mark.redis)
        if "browser" in fixtures:
            item.add_marker(pytest.mark.browser)
        if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
            item.add_marker(pytest.mark.fuzz)


@pytest.fixture(autouse=True)
def _quick_job_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle job runner and callback loop look for work every 50 ms instead of every
    second: a job advances a round at a time, and in-process tests wait on each round.
    Child processes (the e2e layer) keep the product's 1 s."""
    monkeypatch.setattr(job_runner, "POLL_S", 0.05)
    monkeypatch.setattr(job_webhook, "POLL_S", 0.05)


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


@pytest.fixture
def freelancer() -> FakeFreelancer:
    """A fake Freelancer; apps from `start_app` in the same test call it."""
    return FakeFreelancer()


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
                    transport=httpx.ASGITransport(app=manager.app), base_url="http://localhost"
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
