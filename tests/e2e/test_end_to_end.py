"""The real app and the standalone simulator as separate processes, over real HTTP."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.procs import Process, assert_clean_exit, free_port, sim_stats

pytestmark = pytest.mark.e2e

IDS = [*range(1, 21), 97]  # the simulator has no user 97 (ids divisible by 97 do not exist)


def lookup(process: Process, ids: list[int]) -> dict[str, Any]:
    response = httpx.post(f"{process.url}/api/users", json={"user_ids": ids}, timeout=15)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_cold_batch_then_cache_then_restart_serves_from_the_store(
    gateway_process: Process, simulator: Process
) -> None:
    gateway_process.start()
    health = httpx.get(gateway_process.url + "/", timeout=5).json()
    assert (health["status"], health["store"], health["upstream"]) == (
        "healthy",
        "sqlite",
        "freelancer",
    )

    cold = lookup(gateway_process, IDS)
    assert [u["user_id"] for u in cold["users"]] == list(range(1, 21))
    assert {u["source"] for u in cold["users"]} == {"fetched"}
    assert cold["not_found"] == [97]
    assert all(
        u["avatar_url"] is None or u["avatar_url"].startswith("https://") for u in cold["users"]
    )
    after_cold = sim_stats(simulator)
    assert after_cold["unique_ids"] == 21
    assert after_cold["duplicate_lookups"] == 0

    warm = lookup(gateway_process, IDS)
    assert [u["user_id"] for u in warm["users"]] == list(range(1, 21))
    assert {u["source"] for u in warm["users"]} == {"cache"}
    assert warm["not_found"] == [97]
    assert sim_stats(simulator)["calls"] == after_cold["calls"], "no new upstream call"

    assert_clean_exit(gateway_process)
    gateway_process.start()
    restarted = lookup(gateway_process, list(range(1, 21)))
    assert [u["user_id"] for u in restarted["users"]] == list(range(1, 21))
    assert {u["source"] for u in restarted["users"]} == {"cache"}
    assert [u["created_at"] for u in restarted["users"]] == [u["created_at"] for u in cold["users"]]
    assert sim_stats(simulator)["calls"] == after_cold["calls"], "served from the store"

    single = httpx.get(f"{gateway_process.url}/api/users/194", timeout=15)
    assert single.status_code == 404
    assert single.json()["error"] == "not_found"
    stats = httpx.get(f"{gateway_process.url}/api/stats", timeout=5).json()
    assert stats["store"] == "sqlite"
    assert stats["total_users_cached"] == 20


def test_uvicorn_serves_the_module_level_app(tmp_path: Path, simulator: Process) -> None:
    """`uvicorn app.main:app` builds the app from the environment when it asks for it."""
    port = free_port()
    process = Process(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port)],
        port,
        tmp_path / "uvicorn.log",
        env={
            "SQLITE_PATH": str(tmp_path / "users.db"),
            "FREELANCER_API_BASE": f"{simulator.url}/api/users/0.1/users",
        },
        cwd=tmp_path,
    )
    process.start()
    try:
        assert [u["user_id"] for u in lookup(process, [3, 4])["users"]] == [3, 4]
    finally:
        assert_clean_exit(process)
