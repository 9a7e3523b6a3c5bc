"""Fixtures the gateway's tests share: gateways coordinated through a real redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from app.coordination.client import connect
from app.coordination.redis_coordinator import RedisCoordinator
from app.gateway import Gateway
from app.store import SqliteUserStore
from tests.support.apps import make_settings
from tests.support.freelancer import SlowUpstream
from tests.support.procs import RedisServer

StartGateway = Callable[..., Awaitable[Gateway]]
"""Starts a gateway on `tmp_path`'s SQLite file, on the test's redis-server, calling the
given upstream (`prefix` and setting overrides by keyword); each is stopped after the test."""


@pytest.fixture
async def start_gateway(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[StartGateway]:
    started: list[Gateway] = []

    async def start(upstream: SlowUpstream, *, prefix: str = "t", **overrides: float) -> Gateway:
        coordinator = RedisCoordinator(
            connect(redis_server.url, 1.0), prefix=prefix, lease_s=2.0, timeout_s=1.0
        )
        gateway = Gateway(
            settings=make_settings(tmp_path, **overrides),
            store=SqliteUserStore(tmp_path / "users.db"),
            upstream=upstream,
            coordinator=coordinator,
        )
        await gateway.start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        await gateway.stop()
