"""The single-flight core, through the HTTP API, against a fake Freelancer.

Each test names the trap from shared/single-flight-traps.md it guards against.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.support.apps import FlakyStore, StartApp, until
from tests.support.freelancer import FakeFreelancer, error_response


async def test_concurrent_requests_fetch_each_id_once(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    freelancer.latency_s = 0.05
    # 50 clients over overlapping windows of 20 ids out of 1..69.
    bodies = await asyncio.gather(*(running.lookup(*range(i, i + 20)) for i in range(1, 51)))
    for i, body in enumerate(bodies, start=1):
        assert [u["user_id"] for u in body["users"]] == list(range(i, i + 20))
        assert body["total_count"] == 20
        assert body["unavailable"] == []
    assert set(freelancer.lookups) == set(range(1, 70))
    assert max(freelancer.lookups.values()) == 1
    assert len(freelancer.calls) <= 10
    stats = (await running.client.get("/api/stats")).json()
    assert stats["coalesced"] > 0
    assert stats["upstream_ids_requested"] == 69
    assert running.gateway.processing_count == 0


async def test_user_fields_are_mapped_from_freelancer(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    body = await running.lookup(7)
    user = body["users"][0]
    assert user["username"] == "user7"
    assert user["country"] == "Australia"
    assert user["city"] == "Sydney"
    assert user["display_name"] == "User 7"
    assert user["avatar_url"] == "https://cdn.test/7.jpg"
    assert user["registration_date"] == "2017-07-14T02:40:07Z"
    assert user["created_at"].endswith("Z")
    assert user["source"] == "fetched"
    assert user["stale"] is False


async def test_second_request_is_served_from_cache_without_upstream_call(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    await running.lookup(1, 2, 3)
    body = await running.lookup(3, 2, 1)
    assert [u["user_id"] for u in body["users"]] == [3, 2, 1]
    assert {u["source"] for u in body["users"]} == {"cache"}
    assert len(freelancer.calls) == 1


async def test_users_are_saved_to_the_store_and_served_from_it_after_memory_is_lost(
    start_app: StartApp, freelancer: FakeFreelancer, tmp_path: Any
) -> None:
    first = await start_app()
    await first.lookup(11, 12)
    assert await first.gateway.wait_idle(5)
    stored = await first.gateway.store.get_many([11, 12])
    assert sorted(stored) == [11, 12]
    # A second app on the same SQLite file has an empty memory cache.
    second = await start_app()
    body = await second.lookup(11, 12)
    assert [u["source"] for u in body["users"]] == ["cache", "cache"]
    assert len(freelancer.calls) == 1


async def test_duplicate_ids_in_one_request_are_folded(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    body = await running.lookup(5, 5, 6, 5)
    assert [u["user_id"] for u in body["users"]] == [5, 6]
    assert freelancer.lookups == {5: 1, 6: 1}


async def test_ids_freelancer_leaves_out_are_not_found_and_remembered(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    freelancer.missing = {404, 405}
    body = await running.lookup(1, 404, 405)
    assert body["not_found"] == [404, 405]
    assert [u["user_id"] for u in body["users"]] == [1]
    again = await running.lookup(404)
    assert again["not_found"] == [404]
    assert len(freelancer.calls) == 1, "a not-found id is an answer: not fetched again"
    single = await running.client.get("/api/users/405")
    assert single.status_code == 404
    assert single.json()["error"] == "not_found"


async def test_waiters_of_a_failing_id_all_get_the_error_and_nothing_is_left_in_flight(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(upstream_max_attempts=3)
    freelancer.always = error_response(500)
    bodies = await asyncio.gather(*(running.lookup(21, 22) for _ in range(10)))
    for body in bodies:
        assert body["unavailable"] == [21, 22]
        assert body["errors"] == {"21": "upstream_error", "22": "upstream_error"}
    assert len(freelancer.calls) == 3, "one call per attempt, not per waiter"
    assert running.gateway.processing_count == 0
    queue = (await running.client.get("/api/queue")).json()
    assert queue["processing_count"] == 0
    assert queue["currently_processing"] == []


async def test_deadline_answers_unavailable_and_the_fetch_is_cached_for_next_time(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(wait_timeout_s=0.2)
    freelancer.latency_s = 0.5
    body = await running.lookup(31)
    assert body["unavailable"] == [31]
    assert body["errors"] == {"31": "timeout"}
    assert await running.gateway.wait_idle(5)
    later = await running.lookup(31)
    assert later["users"][0]["source"] == "cache"
    assert len(freelancer.calls) == 1


async def test_single_user_endpoint_times_out_with_504(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(wait_timeout_s=0.1)
    freelancer.latency_s = 0.4
    response = await running.client.get("/api/users/32")
    assert response.status_code == 504
    assert response.json()["reason"] == "timeout"
    assert await running.gateway.wait_idle(5)
    ok = await running.client.get("/api/users/32")
    assert ok.status_code == 200
    assert ok.json()["username"] == "user32"


async def test_miss_that_races_the_completion_does_not_fetch_again(
    start_app: StartApp, freelancer: FakeFreelancer, tmp_path: Path
) -> None:
    """Trap 1: a request whose store read spans the fetch's completion must not re-queue."""
    store = FlakyStore(tmp_path / "users.db")
    running = await start_app(store=store)
    gateway = running.gateway
    read_started = asyncio.Event()
    release_read = asyncio.Event()

    async def slow_read() -> None:
        # The read happened before the fetch is saved (a miss); it returns only later.
        read_started.set()
        await release_read.wait()

    freelancer.gate = asyncio.Event()
    first = asyncio.create_task(running.lookup(41))
    await freelancer.arrived.wait()
    store.after_read = slow_read
    second = asyncio.create_task(running.lookup(41))
    await read_started.wait()
    freelancer.gate.set()
    await first  # the fetch completed and left the in-flight map
    assert gateway.processing_count == 0
    release_read.set()
    body = await second
    assert body["users"][0]["user_id"] == 41
    assert len(freelancer.calls) == 1


async def test_a_waiter_that_gives_up_does_not_cancel_the_fetch_for_others(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """Trap 2: a client disconnect (task cancelled) must not kill the shared Future."""
    running = await start_app()
    freelancer.gate = asyncio.Event()
    leaver = asyncio.create_task(running.gateway.lookup([51]))
    stayer = asyncio.create_task(running.gateway.lookup([51]))
    await freelancer.arrived.wait()
    leaver.cancel()
    freelancer.gate.set()
    result = await stayer
    assert result.user_ids == [51]
    assert orjson.loads(result.to_json())["users"][0]["source"] in {"fetched", "shared"}
    assert len(freelancer.calls) == 1
    assert leaver.cancelled()


async def test_a_failure_nobody_waits_for_logs_no_unretrieved_exception(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """Trap 3: Futures carry values, so an abandoned failure leaves nothing to report."""
    running = await start_app(wait_timeout_s=0.05, upstream_max_attempts=1)
    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    freelancer.latency_s = 0.2
    freelancer.always = error_response(503)
    body = await running.lookup(61)
    assert body["errors"] == {"61": "timeout"}
    assert await running.gateway.wait_idle(5)
    gc.collect()
    await asyncio.sleep(0)
    assert reported == []
    loop.set_exception_handler(None)


async def test_a_crashed_worker_is_restarted_and_health_says_degraded(
    start_app: StartApp, freelancer: FakeFreelancer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trap 4: a worker that dies is restarted; what it held is answered, not stranded."""
    running = await start_app()
    gateway = running.gateway
    # No seam reaches inside the worker, so a bug is planted in its queue: the first
    # batch it gathers blows up in its hands, after the ids were taken off the queue.
    real_drain = gateway.queue._drain
    crashes: list[list[int]] = []

    def crash_once(
        batch: list[int], size: int, accept: Callable[[int], bool], order: tuple[int, ...]
    ) -> None:
        real_drain(batch, size, accept, order)
        if not crashes:
            crashes.append(batch[:])
            raise RuntimeError("bug in the worker")

    monkeypatch.setattr(gateway.queue, "_drain", crash_once)
    body = await running.lookup(71)
    assert body["errors"] == {"71": "upstream_error"}
    health = (await running.client.get("/")).json()
    assert health["status"] == "degraded"
    assert any("restarted" in p for p in health["problems"])
    # error_ttl remembers 71 as failing; a new id goes through the restarted worker.
    later = await running.lookup(72)
    assert later["users"][0]["user_id"] == 72
    assert gateway.stats.worker_restarts == 1
    assert gateway.processing_count == 0


async def test_a_full_queue_refuses_the_whole_request_with_503(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """Trap 5: no blocking put; the request's ids are registered all or nothing."""
    running = await start_app(queue_max=100, upstream_concurrency=1, batch_size=10)
    freelancer.gate = asyncio.Event()
    first = asyncio.create_task(
        running.client.post("/api/users", json={"user_ids": list(range(1, 96))})
    )
    await until(lambda: running.gateway.processing_count == 95)
    refused = await running.client.post("/api/users", json={"user_ids": list(range(200, 220))})
    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"] == "overloaded"
    assert running.gateway.processing_count == 95, "nothing of the refused request registered"
    freelancer.gate.set()
    assert (await first).status_code == 200
    assert not freelancer.lookups.keys() & set(range(200, 220))


async def test_too_many_waiters_on_one_id_are_shed_with_503(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """Trap 10: waiters per id are bounded."""
    running = await start_app(max_waiters_per_id=2)
    freelancer.gate = asyncio.Event()
    waiting = [asyncio.create_task(running.lookup(81)) for _ in range(2)]
    await freelancer.arrived.wait()
    await until(lambda: running.gateway.stats.coalesced == 1)
    refused = await running.client.post("/api/users", json={"user_ids": [81]})
    assert refused.status_code == 503
    freelancer.gate.set()
    for task in waiting:
        assert (await task)["users"][0]["user_id"] == 81


async def test_a_retrying_batch_does_not_hold_up_other_ids(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """Trap 6: retries run in their own batch, concurrently with fresh batches."""
    running = await start_app(upstream_concurrency=2, upstream_backoff_s=0.3, batch_window_ms=0)
    freelancer.failures = [error_response(502)]
    slow = asyncio.create_task(running.lookup(91))
    await freelancer.arrived.wait()
    fast = await running.lookup(92)
    assert fast["users"][0]["user_id"] == 92
    assert not slow.done(), "92 was answered while 91 still waited for its retry"
    assert (await slow)["users"][0]["user_id"] == 91
    assert freelancer.lookups[91] == 2


async def test_a_burst_of_separate_requests_is_coalesced_into_one_batch(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """Trap 8: the window gathers ids from concurrent requests into one call."""
    running = await start_app(batch_window_ms=50, upstream_concurrency=1)
    await asyncio.gather(*(running.lookup(uid) for uid in range(101, 106)))
    assert freelancer.calls == [[101, 102, 103, 104, 105]] or (
        len(freelancer.calls) == 1 and sorted(freelancer.calls[0]) == list(range(101, 106))
    )


async def test_batches_never_exceed_batch_size(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(batch_size=25)
    await running.lookup(*range(1000, 1100))
    assert max(len(c) for c in freelancer.calls) <= 25
    assert sum(len(c) for c in freelancer.calls) == 100


async def test_upstream_error_surfaces_as_503_on_the_single_endpoint(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(upstream_max_attempts=1)
    freelancer.always = httpx.Response(200, content=b"<html>not json</html>")
    response = await running.client.get("/api/users/111")
    assert response.status_code == 503
    assert response.json() == {
        "error": "unavailable",
        "detail": "user 111 is unavailable: Freelancer is failing (upstream_error)",
        "reason": "upstream_error",
    }
