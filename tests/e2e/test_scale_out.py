"""Several gateway processes as one, through a real redis-server and the simulator process.

Upstream look-ups are counted at the simulator, never in the gateways.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.procs import (
    Process,
    RedisServer,
    assert_clean_exit,
    gateway_process,
    sim_configure,
    sim_stats,
)

pytestmark = pytest.mark.e2e

LEASE_S = 2.0


def post(process: Process, ids: list[int], timeout: float = 15) -> tuple[int, dict[str, Any]]:
    response = httpx.post(f"{process.url}/api/users", json={"user_ids": ids}, timeout=timeout)
    return response.status_code, response.json()


def health(process: Process) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{process.url}/", timeout=5).json()
    return body


def wait_for(condition: Any, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not met within {within_s} s")
        time.sleep(0.05)


def gateway(tmp_path: Path, simulator: Process, redis: RedisServer, **env: str) -> Process:
    """A gateway process on the shared SQLite file and the shared Redis (not started)."""
    settings = {
        "REDIS_URL": redis.url,
        "FLIGHT_LEASE_S": str(LEASE_S),
        "LOG_LEVEL": "INFO",
        **env,
    }
    return gateway_process(tmp_path, simulator, **settings)


StartGateways = Callable[..., list[Process]]


@pytest.fixture
def start_gateways(
    tmp_path: Path, simulator: Process, redis_server: RedisServer
) -> Iterator[StartGateways]:
    """Start `count` gateways of one deployment; each still running is stopped at the end."""
    started: list[Process] = []

    def start(count: int = 1, **env: str) -> list[Process]:
        new = [gateway(tmp_path, simulator, redis_server, **env) for _ in range(count)]
        started.extend(new)
        for process in new:
            process.start()
        return new

    yield start
    for process in started:
        if process.popen is not None and process.popen.poll() is None:
            process.stop()


def overlapping_batches(seed: int, base: int) -> tuple[list[list[int]], int]:
    rng = random.Random(seed)
    universe = list(range(base, base + 300))
    batches = [rng.sample(universe, 40) for _ in range(20)]
    return batches, len({i for b in batches for i in b})


def test_four_workers_look_up_each_id_once(
    simulator: Process, start_gateways: StartGateways
) -> None:
    sim_configure(simulator, latency_ms=100)
    (process,) = start_gateways(WORKERS="4")
    wait_for(lambda: health(process)["processes"] == 4)
    assert health(process)["coordination"] == "redis"
    batches, unique = overlapping_batches(1, 1_000_000)
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda ids: post(process, ids), batches))
    for ids, (status, body) in zip(batches, answers, strict=True):
        assert status == 200
        assert body["unavailable"] == []
        assert sorted([u["user_id"] for u in body["users"]] + body["not_found"]) == sorted(ids)
    after = sim_stats(simulator)
    assert after["ids_requested"] == unique == after["unique_ids"], after
    assert_clean_exit(process)


def test_two_processes_share_fetches_evictions_and_memory(
    simulator: Process, start_gateways: StartGateways
) -> None:
    sim_configure(simulator, latency_ms=100)
    a, b = start_gateways(2)
    wait_for(lambda: health(a)["processes"] == 2)
    batches, unique = overlapping_batches(2, 2_000_000)
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(post, [a, b] * 10, batches))
    assert all(status == 200 and not body["unavailable"] for status, body in answers)
    assert sim_stats(simulator)["ids_requested"] == unique
    # a fetches 5; b answers it without a call (from the store, or the outcome a announced).
    status, body = post(a, [5])
    assert (status, body["users"][0]["source"]) == (200, "fetched")
    wait_for(lambda: post(b, [5])[1]["users"][0]["source"] == "cache", within_s=5)
    calls = sim_stats(simulator)["calls"]
    # An eviction on b reaches a's memory: a fetches 5 again.
    assert httpx.delete(f"{b.url}/api/cache/users/5", timeout=5).json()["evicted"]
    wait_for(lambda: post(a, [5])[1]["users"][0]["source"] == "fetched", within_s=5)
    assert sim_stats(simulator)["calls"] == calls + 1


def test_one_budget_is_shared_by_every_process(
    simulator: Process, start_gateways: StartGateways
) -> None:
    """20 calls a minute for two processes together, four clients hammering new ids on
    both for 5 s: the simulator's ledger shows the whole minute used at once (the old
    budget paced it: a burst, then one call every 3 s), and never more than 20 in any 60 s."""
    sim_configure(simulator, latency_ms=0)
    env = {"UPSTREAM_RATE_PER_MIN": "20", "BATCH_WINDOW_MS": "0", "WAIT_TIMEOUT_S": "1"}
    env["SHUTDOWN_GRACE_S"] = "1"  # the ids still queued wait a minute for the budget
    a, b = start_gateways(2, **env)
    wait_for(lambda: health(a)["processes"] == 2)
    started = time.monotonic()

    def hammer(process: Process, base: int) -> None:
        uid = base
        while time.monotonic() - started < 5:
            uid += 1
            post(process, [uid], timeout=10)

    threads = [
        threading.Thread(target=hammer, args=(p, base))
        for p, base in ((a, 3_000_000), (b, 4_000_000), (a, 5_000_000), (b, 6_000_000))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    ledger = sim_stats(simulator)
    assert ledger["max_calls_in_60s"] == ledger["calls"] == 20, ledger
    windows = {w["name"]: w for w in health(b)["budget"]}
    assert (windows["minute"]["used"], windows["minute"]["remaining"]) == (20, 0)
    assert windows["minute"]["next_call_in_s"] > 50, "until the first call leaves the minute"


def test_an_owner_killed_mid_fetch_is_taken_over_within_the_lease(
    simulator: Process, start_gateways: StartGateways
) -> None:
    sim_configure(simulator, latency_ms=3000)
    owner, waiter = start_gateways(2)
    with ThreadPoolExecutor(2) as pool:
        pool.submit(post, owner, [7_000_001])
        time.sleep(0.5)  # the owner holds the lease and waits on the simulator
        waiting = pool.submit(post, waiter, [7_000_001])
        time.sleep(0.5)  # the waiter waits on the owner's announcement
        sim_configure(simulator, latency_ms=0)
        assert owner.popen is not None
        owner.popen.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        status, body = waiting.result(timeout=15)
    taken_over_s = time.monotonic() - killed
    assert status == 200
    assert [u["user_id"] for u in body["users"]] == [7_000_001]
    assert taken_over_s <= LEASE_S + 1.0, taken_over_s


@pytest.mark.parametrize("fault", ["stopped", "frozen"])
def test_requests_are_answered_while_redis_is_gone_and_coordination_comes_back(
    simulator: Process,
    redis_server: RedisServer,
    start_gateways: StartGateways,
    fault: str,
) -> None:
    sim_configure(simulator, latency_ms=20)
    a, b = start_gateways(2, REDIS_TIMEOUT_S="0.3")
    post(a, list(range(1, 51)))  # cached: hits never need Redis
    answered: list[tuple[int, float]] = []
    stop = threading.Event()

    def traffic(process: Process, base: int) -> None:
        uid = base
        while not stop.is_set():
            uid += 1
            started = time.monotonic()
            status, _ = post(process, [1, 2, 3, uid], timeout=15)
            answered.append((status, time.monotonic() - started))

    threads = [
        threading.Thread(target=traffic, args=(p, n)) for p, n in ((a, 8_000_000), (b, 9_000_000))
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    if fault == "stopped":
        redis_server.stop()
    else:
        redis_server.freeze()
    time.sleep(LEASE_S + 1.5)  # longer than a lease
    degraded = health(a)
    assert degraded["status"] == "degraded"
    assert any("REDIS_URL" in p for p in degraded["problems"])
    if fault == "stopped":
        redis_server.start()
    else:
        redis_server.thaw()
    wait_for(lambda: not any("REDIS_URL" in p for p in health(a)["problems"]), within_s=10)
    stop.set()
    for thread in threads:
        thread.join(20)
    assert answered and all(status == 200 for status, _ in answered), answered[:5]
    assert max(elapsed for _, elapsed in answered) < 10, "every request in time"
    assert health(b)["coordination"] == "redis"


def test_jobs_run_once_for_the_deployment_and_any_process_answers_about_them(
    simulator: Process, start_gateways: StartGateways
) -> None:
    sim_configure(simulator, latency_ms=20)
    a, b = start_gateways(2)
    wait_for(lambda: health(a)["processes"] == 2)
    before = sim_stats(simulator)
    submitted = httpx.post(f"{a.url}/api/jobs", json={"id_range": [8_000_001, 8_001_000]})
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]
    seen: dict[str, Any] = {}

    def finished() -> bool:
        seen.update(httpx.get(f"{b.url}/api/jobs/{job_id}", timeout=5).json())
        return bool(seen["status"] == "completed")

    wait_for(finished, within_s=30)
    after = sim_stats(simulator)
    assert after["ids_requested"] - before["ids_requested"] == 1000, "one runner, once per id"
    assert (seen["found"], seen["upstream_calls"]) == (1000 - 10, 10)  # 97 divides 10 ids
    runners = [httpx.get(f"{p.url}/api/stats", timeout=5).json()["jobs"] for p in (a, b)]
    assert sorted(r["running_here"] for r in runners) == [False, True]
