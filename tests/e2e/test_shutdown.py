"""SIGTERM on a real process: in-flight requests are answered, then a clean exit."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from tests.support.procs import Process, assert_clean_exit

pytestmark = pytest.mark.e2e


def test_sigterm_lets_fetches_in_flight_finish_and_exits_cleanly(
    gateway_process: Process, simulator: Process
) -> None:
    gateway_process.start()
    httpx.post(f"{simulator.url}/_sim/config", json={"latency_ms": 1000}, timeout=5)
    answers: list[Any] = []

    def ask() -> None:
        try:
            response = httpx.post(
                f"{gateway_process.url}/api/users", json={"user_ids": [5, 6]}, timeout=15
            )
            answers.append((response.status_code, response.json()))
        except httpx.HTTPError as exc:  # recorded, so the assertion below explains it
            answers.append(exc)

    client = threading.Thread(target=ask)
    client.start()
    stats_url = f"{simulator.url}/_sim/stats"
    for _ in range(200):  # at most ~10 s: wait for the upstream call to be in flight
        if httpx.get(stats_url, timeout=5).json()["calls"] >= 1:
            break
        threading.Event().wait(0.05)
    assert_clean_exit(gateway_process)
    client.join(20)
    assert not client.is_alive()
    assert len(answers) == 1
    status, body = answers[0]
    assert status == 200
    assert [u["user_id"] for u in body["users"]] == [5, 6]
