"""Stale-while-revalidate, stale-if-error, negative caches, eviction, background refreshes.

Time is a `FakeClock` the tests step, passed to the app as its wall clock.
"""

from __future__ import annotations

import asyncio

from app.domain import UserRecord
from tests.support.apps import Running, StartApp, until
from tests.support.clock import FakeClock
from tests.support.freelancer import FakeFreelancer, error_response

TTL = 1000.0


async def store_user(running: Running, user_id: int, *, age_s: float) -> None:
    """Put a user in the store as if fetched `age_s` ago (and first cached long before)."""
    fetched = running.gateway.clock() - age_s
    record = UserRecord(user_id, f"old{user_id}", created_at=fetched - 500, fetched_at=fetched)
    await running.gateway.store.upsert_many([record])


async def test_a_stale_user_is_served_at_once_and_refreshed_in_the_background(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(cache_ttl_s=TTL)
    await store_user(running, 1, age_s=TTL + 10)
    body = await running.lookup(1)
    user = body["users"][0]
    assert (user["username"], user["source"], user["stale"]) == ("old1", "stale", True)
    assert await running.gateway.wait_idle(5)
    assert freelancer.lookups == {1: 1}
    fresh = (await running.lookup(1))["users"][0]
    assert (fresh["username"], fresh["source"], fresh["stale"]) == ("user1", "cache", False)
    assert fresh["created_at"] == user["created_at"], "a refresh keeps when it was first cached"
    stored = await running.gateway.store.get_many([1])
    assert stored[1].username == "user1"
    assert len(freelancer.calls) == 1


async def test_many_requests_for_a_stale_user_trigger_one_refresh(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(cache_ttl_s=TTL)
    await store_user(running, 2, age_s=TTL + 10)
    for _ in range(5):
        assert (await running.lookup(2))["users"][0]["user_id"] == 2
    assert await running.gateway.wait_idle(5)
    assert freelancer.lookups == {2: 1}


async def test_a_failed_refresh_keeps_serving_the_stale_copy(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(cache_ttl_s=TTL, stale_if_error_s=500, upstream_max_attempts=1)
    freelancer.always = error_response(500)
    await store_user(running, 3, age_s=TTL + 10)
    assert (await running.lookup(3))["users"][0]["source"] == "stale"
    assert await running.gateway.wait_idle(5)
    again = await running.lookup(3)
    assert again["users"][0]["username"] == "old3"
    assert again["users"][0]["stale"] is True
    assert again["unavailable"] == []
    assert len(freelancer.calls) == 1, "the failing id is not retried on every request"


async def test_past_stale_if_error_a_user_is_a_miss_again(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(
        cache_ttl_s=TTL, stale_if_error_s=100, upstream_max_attempts=1, error_ttl_s=0
    )
    await store_user(running, 4, age_s=TTL + 200)
    freelancer.always = error_response(500)
    failed = await running.lookup(4)
    assert failed["users"] == [], "too old to serve, even while Freelancer fails"
    assert failed["unavailable"] == [4]
    freelancer.always = None
    body = await running.lookup(4)
    assert body["users"][0]["username"] == "user4"
    assert body["users"][0]["source"] == "fetched"
    assert len(freelancer.calls) == 2


async def test_a_failing_id_is_answered_unavailable_without_calling_again(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(upstream_max_attempts=2, error_ttl_s=60)
    freelancer.always = error_response(500)
    assert (await running.lookup(5))["errors"] == {"5": "upstream_error"}
    assert len(freelancer.calls) == 2
    again = await running.lookup(5)
    assert again["errors"] == {"5": "upstream_error"}
    assert len(freelancer.calls) == 2


async def test_not_found_is_forgotten_after_its_ttl(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    clock = FakeClock()
    running = await start_app(clock=clock, not_found_ttl_s=60)
    freelancer.missing = {6}
    assert (await running.lookup(6))["not_found"] == [6]
    freelancer.missing = set()
    clock.advance(59)
    assert (await running.lookup(6))["not_found"] == [6], "remembered for NOT_FOUND_TTL_S"
    assert len(freelancer.calls) == 1
    clock.advance(2)
    assert (await running.lookup(6))["users"][0]["user_id"] == 6
    assert len(freelancer.calls) == 2


async def test_a_failing_id_is_tried_again_after_its_error_ttl(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    clock = FakeClock()
    running = await start_app(clock=clock, upstream_max_attempts=1, error_ttl_s=30)
    freelancer.always = error_response(500)
    assert (await running.lookup(16))["errors"] == {"16": "upstream_error"}
    freelancer.always = None
    clock.advance(29)
    assert (await running.lookup(16))["errors"] == {"16": "upstream_error"}
    assert len(freelancer.calls) == 1
    clock.advance(2)
    assert (await running.lookup(16))["users"][0]["source"] == "fetched"
    assert len(freelancer.calls) == 2


async def test_a_fetched_user_turns_stale_after_the_ttl_then_too_old_to_serve(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    clock = FakeClock()
    running = await start_app(
        clock=clock, cache_ttl_s=TTL, stale_if_error_s=100, upstream_max_attempts=1
    )
    first = (await running.lookup(17))["users"][0]
    clock.advance(TTL - 1)
    assert (await running.lookup(17))["users"][0]["source"] == "cache"
    freelancer.always = error_response(500)  # refreshes fail from now on
    clock.advance(2)
    stale = (await running.lookup(17))["users"][0]
    assert (stale["source"], stale["stale"]) == ("stale", True)
    assert await running.gateway.wait_idle(5)
    clock.advance(100)
    gone = await running.lookup(17)
    assert (gone["users"], gone["unavailable"]) == ([], [17]), "past STALE_IF_ERROR_S"
    freelancer.always = None
    clock.advance(31)  # past ERROR_TTL_S (30 s by default)
    fresh = (await running.lookup(17))["users"][0]
    assert fresh["source"] == "fetched"
    assert fresh["created_at"] == first["created_at"], "a refetch keeps when it was first cached"
    assert fresh["fetched_at"] > first["fetched_at"]


async def test_delete_evicts_a_user_from_store_and_memory(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    await running.lookup(7)
    assert await running.gateway.wait_idle(5)
    response = await running.client.delete("/api/cache/users/7")
    assert response.json() == {"user_id": 7, "evicted": True}
    assert await running.gateway.store.get_many([7]) == {}
    assert (await running.lookup(7))["users"][0]["source"] == "fetched"
    assert len(freelancer.calls) == 2
    unknown = await running.client.delete("/api/cache/users/999999")
    assert unknown.json() == {"user_id": 999999, "evicted": False}


async def test_clear_expired_removes_only_users_past_ttl_plus_stale_window(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(cache_ttl_s=TTL, stale_if_error_s=100)
    await store_user(running, 8, age_s=TTL + 200)
    await store_user(running, 9, age_s=TTL + 50)
    await store_user(running, 10, age_s=5)
    response = await running.client.post("/api/cache/clear-expired")
    assert response.json() == {"removed": 1}
    assert sorted(await running.gateway.store.get_many([8, 9, 10])) == [9, 10]


async def test_revalidate_queues_background_refreshes(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(cache_ttl_s=TTL)
    await store_user(running, 11, age_s=50)
    await store_user(running, 12, age_s=500)
    response = await running.client.post("/api/cache/revalidate", json={"user_ids": [11, 13]})
    assert response.status_code == 202
    assert response.json() == {"queued": 2}
    assert await running.gateway.wait_idle(5)
    assert freelancer.lookups == {11: 1, 13: 1}
    stored = await running.gateway.store.get_many([11, 13])
    assert stored[11].username == "user11" and stored[13].username == "user13"
    older = await running.client.post("/api/cache/revalidate", json={"older_than_s": 100})
    assert older.json() == {"queued": 1}
    assert await running.gateway.wait_idle(5)
    assert freelancer.lookups[12] == 1
    bad = await running.client.post("/api/cache/revalidate", json={})
    assert bad.status_code == 422
    assert "exactly one" in bad.json()["detail"]


async def test_the_sweep_refreshes_users_about_to_turn_stale(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(cache_ttl_s=TTL, refresh_interval_s=0.05)
    await store_user(running, 14, age_s=TTL - 0.01)  # stale within the next interval
    await store_user(running, 15, age_s=10)
    await freelancer.arrived.wait()
    assert await running.gateway.wait_idle(5)
    assert 14 in freelancer.lookups
    assert 15 not in freelancer.lookups


async def test_revalidate_refuses_what_is_not_a_number_of_seconds(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    for body in ({"older_than_s": True}, {"older_than_s": "5"}, {"older_than_s": -1}):
        response = await running.client.post("/api/cache/revalidate", json=body)
        assert response.status_code == 422, body
    accepted = await running.client.post("/api/cache/revalidate", json={"older_than_s": 5})
    assert accepted.status_code == 202


async def test_refreshes_never_fill_the_queue_a_clients_miss_needs(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """Revalidations while Freelancer is slow: they take at most half of QUEUE_MAX, so a
    client's new ids still fit (they were answered 503 'overloaded' when refreshes filled it)."""
    running = await start_app(queue_max=200, upstream_concurrency=1)
    freelancer.gate = asyncio.Event()
    queued = []
    for first in (1_000, 2_000, 3_000):
        body = {"user_ids": list(range(first, first + 100))}
        response = await running.client.post("/api/cache/revalidate", json=body)
        queued.append(response.json()["queued"])
        await until(lambda: bool(freelancer.calls))  # the first 100 are in the air
    assert queued == [100, 100, 0], "half the queue (100), the rest left to clients"
    lookup = asyncio.create_task(running.client.post("/api/users", json={"user_ids": [7, 8]}))
    await until(lambda: running.gateway.queue.qsize() == 102)
    freelancer.gate.set()
    answer = await lookup
    assert answer.status_code == 200 and answer.json()["total_count"] == 2
