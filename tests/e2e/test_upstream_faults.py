"""Bad days upstream: the standalone simulator (a real process, real sockets) injects each
fault while the gateway serves. Every request is answered within its deadline with the
right reason, cached users keep being served, nothing is left in flight, and the gateway
recovers by itself when the simulator does."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.domain import UserRecord
from tests.support.apps import Running, StartApp
from tests.support.procs import Process, free_port

pytestmark = pytest.mark.e2e

CACHED = [1, 2, 3]
WAIT_S = 1.5
# What a client may be told for each fault (the breaker may open during any of them).
REASONS = {
    "error": {"upstream_error", "breaker_open"},
    "hang": {"timeout", "breaker_open"},
    "malformed": {"upstream_error", "breaker_open"},
    "wrong_shape": {"upstream_error", "breaker_open"},
    "rate_limit": {"rate_limited", "breaker_open"},
    "unauthorized": {"auth", "breaker_open"},
    "refused": {"upstream_error", "breaker_open"},
}


def fault_settings(tmp_path: Path, base: str) -> dict[str, Any]:
    return {
        "freelancer_api_base": base,
        "wait_timeout_s": WAIT_S,
        "upstream_timeout_s": 0.4,
        "upstream_max_attempts": 2,
        "upstream_backoff_s": 0.05,
        "breaker_failures": 4,
        "breaker_cooldown_s": 0.5,
        "error_ttl_s": 0.2,
        "sqlite_path": tmp_path / "users.db",
    }


async def seed(running: Running) -> None:
    now = time.time()
    await running.gateway.store.upsert_many(
        [UserRecord(uid, f"cached{uid}", created_at=now, fetched_at=now) for uid in CACHED]
    )


async def post(running: Running, ids: list[int]) -> dict[str, Any]:
    response = await running.client.post("/api/users", json={"user_ids": ids})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def set_fault(simulator: Process, **config: Any) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{simulator.url}/_sim/config", json=config)
        response.raise_for_status()


async def recover(running: Running, uid: int) -> dict[str, Any]:
    """Ask for `uid` until it is answered (breaker cooldown, error TTL): at most 15 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:
        body = await post(running, [uid])
        if body["users"] or loop.time() > deadline:
            return body
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("fault", sorted(REASONS))
async def test_a_fault_upstream_is_survived_and_recovered_from(
    fault: str, simulator: Process, start_app: StartApp, tmp_path: Path
) -> None:
    base = f"{simulator.url}/api/users/0.1/users"
    if fault == "refused":
        base = f"http://127.0.0.1:{free_port()}/api/users/0.1/users"  # nothing listens there
    else:
        await set_fault(simulator, fault=fault, hang_s=3, retry_after_s=1)
    running = await start_app(**fault_settings(tmp_path, base))
    await seed(running)
    loop = asyncio.get_running_loop()

    started = loop.time()
    misses = [asyncio.create_task(post(running, [100 + i, 200 + i])) for i in range(5)]
    cached = await post(running, CACHED)  # served while the misses wait on the fault
    assert [u["username"] for u in cached["users"]] == ["cached1", "cached2", "cached3"]
    if fault == "hang":
        assert not any(m.done() for m in misses), "cached ids did not wait behind the hang"
    bodies = await asyncio.gather(*misses)
    assert loop.time() - started < WAIT_S + 2, "every request answered within its deadline"
    for body in bodies:
        assert body["users"] == []
        assert len(body["unavailable"]) == 2
        assert set(body["errors"].values()) <= REASONS[fault], body["errors"]
    health = (await running.client.get("/")).json()
    assert health["status"] in {"healthy", "degraded"}

    if fault == "refused":
        return  # nothing to heal: the address is wrong, and says so in every answer
    await set_fault(simulator, fault=None)
    healed = await recover(running, 100)
    assert [u["user_id"] for u in healed["users"]] == [100], healed
    assert await running.gateway.wait_idle(10)
    assert running.gateway.processing_count == 0
    assert running.gateway.queue.qsize() == 0
    assert (await running.client.get("/")).json()["status"] == "healthy"
