"""How the gateway behaves when Freelancer fails: retries, 429, 401, the breaker."""

from __future__ import annotations

import asyncio

import httpx

from tests.support.apps import StartApp
from tests.support.freelancer import FakeFreelancer, error_response


async def test_5xx_is_retried_and_then_succeeds(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(upstream_max_attempts=3)
    freelancer.failures = [error_response(500), error_response(503)]
    body = await running.lookup(1, 2)
    assert [u["user_id"] for u in body["users"]] == [1, 2]
    assert len(freelancer.calls) == 3
    stats = (await running.client.get("/api/stats")).json()
    assert (stats["upstream_errors"], stats["upstream_retries"]) == (2, 2)


async def test_timeouts_and_connection_errors_are_retried(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(upstream_max_attempts=2)
    freelancer.failures = [httpx.ReadTimeout("slow"), httpx.ReadTimeout("slow")]
    body = await running.lookup(3)
    assert body["errors"] == {"3": "timeout"}
    assert len(freelancer.calls) == 2
    freelancer.failures = [httpx.ConnectError("refused")]
    body = await running.lookup(4)
    assert body["users"][0]["user_id"] == 4
    assert len(freelancer.calls) == 4


async def test_a_wrong_shape_is_an_upstream_error_not_a_crash(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(upstream_max_attempts=2)
    freelancer.always = httpx.Response(200, json={"status": "success", "result": ["nope"]})
    body = await running.lookup(4)
    assert body["errors"] == {"4": "upstream_error"}
    assert len(freelancer.calls) == 2
    assert running.gateway.processing_count == 0


async def test_401_is_not_retried_and_health_names_the_credential_setting(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(upstream_max_attempts=3)
    freelancer.always = error_response(401)
    body = await running.lookup(5)
    assert body["errors"] == {"5": "auth"}
    assert len(freelancer.calls) == 1
    health = (await running.client.get("/")).json()
    assert health["status"] == "degraded"
    assert any("FREELANCER_OAUTH_TOKEN" in p for p in health["problems"])
    freelancer.always = None
    await running.lookup(6)
    assert (await running.client.get("/")).json()["status"] == "healthy"


async def test_429_pauses_upstream_calls_for_retry_after(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(upstream_max_attempts=3)
    freelancer.failures = [error_response(429, headers={"Retry-After": "0.3"})]
    loop = asyncio.get_running_loop()
    started = loop.time()
    body = await running.lookup(7)
    assert body["users"][0]["user_id"] == 7
    assert loop.time() - started >= 0.3, "the retry waited for Retry-After"
    assert len(freelancer.calls) == 2


async def test_the_rate_limit_is_reported_when_waiters_give_up(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(wait_timeout_s=0.2)
    freelancer.failures = [error_response(429, headers={"Retry-After": "5"})]
    body = await running.lookup(8)
    assert body["errors"] == {"8": "rate_limited"}
    health = (await running.client.get("/")).json()
    assert health["upstream_state"] == "throttled"


async def test_the_breaker_answers_misses_at_once_while_open(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(
        breaker_failures=2, breaker_cooldown_s=60, upstream_max_attempts=1, wait_timeout_s=5
    )
    freelancer.always = error_response(500)
    await running.lookup(10)
    await running.lookup(11)
    assert len(freelancer.calls) == 2
    health = (await running.client.get("/")).json()
    assert health["upstream_state"] == "open"
    loop = asyncio.get_running_loop()
    started = loop.time()
    body = await running.lookup(12, 13)
    assert body["errors"] == {"12": "breaker_open", "13": "breaker_open"}
    assert loop.time() - started < 1.0, "no waiting for a deadline while the breaker is open"
    assert len(freelancer.calls) == 2, "no call while open"


async def test_the_breaker_lets_one_probe_through_after_the_cooldown(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(breaker_failures=1, breaker_cooldown_s=0.2, upstream_max_attempts=1)
    freelancer.failures = [error_response(500)]
    assert (await running.lookup(20))["errors"] == {"20": "upstream_error"}
    assert (await running.lookup(21))["errors"] == {"21": "breaker_open"}
    await asyncio.sleep(0.25)  # the cooldown itself: a duration under test, not a wait for state
    body = await running.lookup(22)
    assert body["users"][0]["user_id"] == 22
    assert (await running.client.get("/")).json()["upstream_state"] == "ok"
    assert len(freelancer.calls) == 2


async def test_rate_limit_remaining_slows_calls_before_freelancer_says_no(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(upstream_rate_per_min=60, upstream_burst=10, batch_window_ms=0)
    ok = httpx.Response(
        200,
        json={"status": "success", "result": {"users": {}}, "request_id": "t"},
        headers={"RateLimit-Remaining": "0"},
    )
    freelancer.failures = [ok]
    await running.lookup(30)
    assert running.gateway.budget.throttled, "Freelancer said nothing is left"
