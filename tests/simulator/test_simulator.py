"""The Freelancer simulator answers in Freelancer's format, with the faults asked of it."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.main import create_app
from app.simulator import SimulatorConfig, create_simulator_app
from app.simulator.ledger import Ledger, read_ledger
from app.simulator.users import synthetic_user
from tests.support.apps import StartApp, make_settings
from tests.support.procs import Process, free_port

USERS = "/api/users/0.1/users/"


@pytest.fixture
async def sim() -> AsyncIterator[httpx.AsyncClient]:
    app = create_simulator_app(SimulatorConfig())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
        yield client


async def configure(client: httpx.AsyncClient, **changes: Any) -> None:
    response = await client.post("/_sim/config", json=changes)
    assert response.status_code == 200, response.text


async def test_a_batch_is_a_map_keyed_by_id_strings_without_missing_ids(
    sim: httpx.AsyncClient,
) -> None:
    response = await sim.get(USERS, params=[("users[]", 1), ("users[]", 97), ("users[]", 2)])
    body = response.json()
    assert body["status"] == "success"
    assert sorted(body["result"]["users"]) == ["1", "2"]
    user = body["result"]["users"]["1"]
    assert user["id"] == 1
    assert {"username", "display_name", "registration_date", "avatar_cdn", "location"} <= set(user)


async def test_the_single_endpoint_answers_200_or_404(sim: httpx.AsyncClient) -> None:
    ok = await sim.get(f"{USERS}5/")
    assert ok.json()["result"]["id"] == 5
    missing = await sim.get(f"{USERS}194")
    assert missing.status_code == 404
    assert missing.json()["error_code"] == "RestExceptionCodes.NOT_FOUND"


def test_users_are_deterministic_and_some_avatars_are_protocol_relative() -> None:
    assert synthetic_user(42) == synthetic_user(42)
    assert synthetic_user(42) != synthetic_user(43)
    assert synthetic_user(97) is None and synthetic_user(10**12 + 1) is None
    avatars = [u["avatar_cdn"] for i in range(1, 40) if (u := synthetic_user(i))]
    assert any(a and a.startswith("//") for a in avatars)
    assert any(a and a.startswith("https://") for a in avatars)
    assert any(a is None for a in avatars)


@pytest.mark.parametrize(
    ("fault", "status"),
    [("error", 500), ("rate_limit", 429), ("unauthorized", 401), ("forbidden", 403)],
)
async def test_faults_answer_with_freelancers_error_bodies(
    sim: httpx.AsyncClient, fault: str, status: int
) -> None:
    await configure(sim, fault=fault, retry_after_s=7)
    response = await sim.get(USERS, params={"users[]": 1})
    assert response.status_code == status
    assert response.json()["status"] == "error"
    if fault == "rate_limit":
        assert response.headers["Retry-After"] == "7"


async def test_malformed_and_wrong_shape_faults(sim: httpx.AsyncClient) -> None:
    await configure(sim, fault="malformed")
    malformed = await sim.get(USERS, params={"users[]": 1})
    with pytest.raises(ValueError):
        malformed.json()
    await configure(sim, fault="wrong_shape")
    assert isinstance((await sim.get(USERS, params={"users[]": 1})).json()["result"], list)


async def test_a_fault_rate_faults_some_requests_repeatably(sim: httpx.AsyncClient) -> None:
    async def statuses() -> list[int]:
        await sim.post("/_sim/reset")
        return [(await sim.get(USERS, params={"users[]": 1})).status_code for _ in range(40)]

    await configure(sim, fault="error", fault_rate=0.5, seed=3)
    first = await statuses()
    assert 0 < first.count(500) < 40
    assert await statuses() == first


async def test_the_rate_limit_counts_down_then_says_429(sim: httpx.AsyncClient) -> None:
    await configure(sim, rate_limit_per_min=2)
    first = await sim.get(USERS, params={"users[]": 1})
    second = await sim.get(USERS, params={"users[]": 1})
    third = await sim.get(USERS, params={"users[]": 1})
    assert first.headers["RateLimit-Remaining"] == "1"
    assert second.headers["RateLimit-Remaining"] == "0"
    assert third.status_code == 429
    assert int(third.headers["Retry-After"]) >= 1


async def test_a_required_token_is_checked(sim: httpx.AsyncClient) -> None:
    await configure(sim, require_token="secret")
    assert (await sim.get(USERS, params={"users[]": 1})).status_code == 401
    ok = await sim.get(USERS, params={"users[]": 1}, headers={"Freelancer-OAuth-V1": "secret"})
    assert ok.status_code == 200


async def test_stats_count_what_was_asked_and_reset(sim: httpx.AsyncClient) -> None:
    await sim.get(USERS, params=[("users[]", 1), ("users[]", 2), ("users[]", 2)])
    await sim.get(USERS, params=[("users[]", 2), ("users[]", 3)])
    stats = (await sim.get("/_sim/stats")).json()
    assert stats["calls"] == 2 and stats["batch_calls"] == 2
    assert (stats["ids_requested"], stats["unique_ids"], stats["duplicate_lookups"]) == (4, 3, 1)
    assert stats["max_ids_per_call"] == 2
    await sim.post("/_sim/reset")
    assert (await sim.get("/_sim/stats")).json()["calls"] == 0


async def test_bad_config_is_refused_with_422(sim: httpx.AsyncClient) -> None:
    assert (await sim.post("/_sim/config", json={"nope": 1})).status_code == 422
    assert (await sim.post("/_sim/config", json={"fault": "explode"})).status_code == 422
    assert (await sim.post("/_sim/config", json={"latency_ms": -1})).status_code == 422
    assert (await sim.get("/_sim/config")).json()["fault"] is None


async def test_latency_delays_every_answer(sim: httpx.AsyncClient) -> None:
    await configure(sim, latency_ms=50)
    started = time.monotonic()
    await sim.get(USERS, params={"users[]": 1})
    assert time.monotonic() - started >= 0.05  # a lower bound, not a speed target


async def test_stats_count_the_most_calls_in_any_minute_and_hour() -> None:
    app = create_simulator_app(SimulatorConfig())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as sim:
        for _ in range(3):
            await sim.get(USERS, params={"users[]": 1})
        stats = (await sim.get("/_sim/stats")).json()
        assert (stats["max_calls_in_60s"], stats["max_calls_in_3600s"]) == (3, 3)
        times = app.state.sim.stats.call_times
        times.clear()
        times.extend([0.0, 10.0, 20.0, 65.0, 70.0, 75.0, 80.0, 3620.0])
        stats = (await sim.get("/_sim/stats")).json()
        assert (stats["max_calls_in_60s"], stats["max_calls_in_3600s"]) == (4, 7)


async def test_the_ledger_records_every_call_with_its_ids_status_and_caller(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path / "calls.ndjson")
    app = create_simulator_app(SimulatorConfig(), ledger=ledger)
    transport = httpx.ASGITransport(app=app)
    agent = {"User-Agent": "freelancer-user-gateway/0.1 (pid 4242)"}
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as sim:
        before = time.time()
        await sim.get(USERS, params=[("users[]", 1), ("users[]", 97)], headers=agent)
        await sim.get(f"{USERS}194/", headers={"User-Agent": "curl/8"})
        await sim.get(USERS, params={"users[]": "x"}, headers=agent)
        after = time.time()
    ledger.close()
    first, second, third = read_ledger(tmp_path / "calls.ndjson")
    assert (first["kind"], first["ids"], first["status"], first["pid"]) == (
        "batch",
        [1, 97],
        200,
        4242,
    )
    assert before <= first["t"] <= first["done"] <= after
    assert (second["kind"], second["ids"], second["status"], second["pid"]) == (
        "single",
        [194],
        404,
        None,
    )
    assert (third["ids"], third["status"], third["pid"]) == ([], 400, 4242)


@pytest.mark.e2e
def test_the_standalone_simulator_keeps_a_ledger_given_on_its_command_line(
    tmp_path: Path,
) -> None:
    port = free_port()
    path = tmp_path / "ledger.ndjson"
    args = [sys.executable, "-m", "app.simulator", "--port", str(port), "--ledger", str(path)]
    process = Process(args, port, tmp_path / "sim.log", cwd=tmp_path)
    process.start("/_sim/stats")
    try:
        httpx.get(f"{process.url}{USERS}", params={"users[]": [5, 6]}, timeout=5)
        assert httpx.get(f"{process.url}/_sim/stats", timeout=5).json()["calls"] == 1
    finally:
        process.stop()
    [entry] = read_ledger(path)
    assert (entry["ids"], entry["status"]) == ([5, 6], 200)


def test_a_ledger_reader_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "ledger.ndjson"
    path.write_text('{"t": 1, "ids": [1]}\n{"t": 2, "ids": [')
    assert read_ledger(path) == [{"t": 1, "ids": [1]}]


async def test_a_gateways_calls_name_its_process_in_the_ledger(
    tmp_path: Path, start_app: StartApp
) -> None:
    ledger = Ledger(tmp_path / "calls.ndjson")
    simulator = create_simulator_app(SimulatorConfig(), ledger=ledger)
    app = create_app(make_settings(tmp_path), upstream_transport=httpx.ASGITransport(app=simulator))
    running = await start_app(app=app)
    await running.lookup(11, 12)
    ledger.close()
    [entry] = read_ledger(tmp_path / "calls.ndjson")
    assert (entry["ids"], entry["pid"]) == ([11, 12], os.getpid())
