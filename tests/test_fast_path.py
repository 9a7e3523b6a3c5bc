"""The hot lookup answered before routing (`app.http.fast_path`) answers what the route does.

Two apps run side by side on one fake clock, built alike but for the fast path, and get
the same requests: every raw answer (status, headers, body), the gateway's counts, the
clients' usage and the request metrics must be the same.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.http import fast_path
from app.http.routers import users
from app.main import create_app
from tests.support.apps import Running, StartApp, make_settings
from tests.support.clock import FakeClock
from tests.support.freelancer import FakeFreelancer

KEY = "fast-key-0123456789abcdef"
KEYS = f"reader:{KEY}:read"
JSON = {"content-type": "application/json"}
KEYED = {**JSON, "x-api-key": KEY}
MISSING = {900, 901}
"""Ids the fake Freelancer says do not exist."""


class Pair:
    """The app with the fast path and the app without it, fed the same requests."""

    def __init__(self, fast: Running, routed: Running, clock: FakeClock) -> None:
        self.fast, self.routed, self.clock = fast, routed, clock

    async def both(
        self, body: bytes, headers: dict[str, str], path: str = "/api/users"
    ) -> tuple[httpx.Response, httpx.Response]:
        fast = await self.fast.client.post(path, content=body, headers=headers)
        routed = await self.routed.client.post(path, content=body, headers=headers)
        return fast, routed


async def make_pair(start_app: StartApp, tmp_path: Path, **overrides: Any) -> Pair:
    """The same app twice, on one clock: with the fast path, and without it (the route)."""
    clock = FakeClock()
    apps: list[Running] = []
    for name, fast in (("fast", True), ("routed", False)):
        folder = tmp_path / name
        folder.mkdir()
        freelancer = FakeFreelancer(missing=MISSING)
        settings = make_settings(folder, api_keys=KEYS, **overrides)
        app = create_app(
            settings, upstream_transport=freelancer.transport, clock=clock, fast_path=fast
        )
        apps.append(await start_app(app=app))
    fast_app, routed_app = apps
    return Pair(fast_app, routed_app, clock=clock)


@pytest.fixture
async def pair(start_app: StartApp, tmp_path: Path) -> Pair:
    return await make_pair(start_app, tmp_path, max_users_per_request=60)


def raw(response: httpx.Response, *, own_id: bool = True) -> tuple[Any, ...]:
    """Status, headers in order (a generated request id masked), body."""
    headers = [
        (name, b"<generated>" if name == b"x-request-id" and not own_id else value)
        for name, value in response.headers.raw
    ]
    return response.status_code, headers, response.content


def ids_body(ids: list[Any]) -> bytes:
    return b'{"user_ids": %s}' % str(ids).encode()


async def warm(pair: Pair, ids: list[int]) -> None:
    for running in (pair.fast, pair.routed):
        answer = await running.client.post("/api/users", json={"user_ids": ids}, headers=KEYED)
        assert answer.status_code == 200, answer.text


def taken(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of lookups the fast path started and the route started."""
    counts = {"fast": 0, "route": 0}
    start = fast_path.start_lookup  # type: ignore[attr-defined]
    route_lookup = users.lookup_for_client  # type: ignore[attr-defined]

    def fast_start(*args: Any) -> Any:
        counts["fast"] += 1
        return start(*args)

    async def routed(*args: Any) -> Any:
        counts["route"] += 1
        return await route_lookup(*args)

    monkeypatch.setattr(fast_path, "start_lookup", fast_start)
    monkeypatch.setattr(users, "lookup_for_client", routed)
    return counts


async def test_memory_hits_are_answered_before_routing(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    await warm(pair, list(range(1, 51)))
    counts = taken(monkeypatch)
    answer = await pair.fast.client.post("/api/users", content=ids_body([1, 2, 3]), headers=KEYED)
    assert answer.status_code == 200
    assert [u["user_id"] for u in answer.json()["users"]] == [1, 2, 3]
    assert counts == {"fast": 1, "route": 0}


HOT = [1, 2, 3, 50, 7]
CASES: list[tuple[str, bytes, dict[str, str]]] = [
    ("hits, own request id", ids_body(HOT), {**KEYED, "x-request-id": "req-1"}),
    ("hits, generated request id", ids_body(list(range(1, 51))), KEYED),
    ("duplicates folded", ids_body([3, 1, 3, 1]), KEYED),
    ("integral floats", b'{"user_ids": [1.0, 2]}', KEYED),
    ("not found, known", ids_body([1, 900, 2, 901]), KEYED),
    ("json with charset", ids_body(HOT), {**KEYED, "content-type": "application/json; q=1"}),
    ("a +json type", ids_body(HOT), {**KEYED, "content-type": "application/vnd.x+json"}),
    ("text/plain", ids_body(HOT), {**KEYED, "content-type": "text/plain"}),
    ("no content type", ids_body(HOT), {"x-api-key": KEY}),
    ("not json", b"{user_ids: [1]}", KEYED),
    ("empty list", ids_body([]), KEYED),
    ("too many ids", ids_body(list(range(1, 62))), KEYED),
    ("an id of 0", ids_body([1, 0]), KEYED),
    ("a string id", b'{"user_ids": [1, "2"]}', KEYED),
    ("a boolean id", b'{"user_ids": [true]}', KEYED),
    ("an unknown field", b'{"user_ids": [1], "x": 1}', KEYED),
    ("not an object", b"[1, 2]", KEYED),
    ("no key", ids_body(HOT), JSON),
    ("unknown key", ids_body(HOT), {**JSON, "x-api-key": "wrong-key-0123456789abcdef"}),
    ("bearer key", ids_body(HOT), {**JSON, "authorization": f"Bearer {KEY}"}),
    ("query string", ids_body(HOT), KEYED),
    ("misses fall through", ids_body([1, 2, 400, 401]), KEYED),
]


async def test_every_answer_equals_the_routes(pair: Pair) -> None:
    await warm(pair, [*range(1, 51), *MISSING])
    for name, body, headers in CASES:
        path = "/api/users?debug=1" if name == "query string" else "/api/users"
        fast, routed = await pair.both(body, headers, path)
        own_id = "x-request-id" in headers
        assert raw(fast, own_id=own_id) == raw(routed, own_id=own_id), name
    pair.clock.advance(86_400 + 1)  # past CACHE_TTL_S: stale copies, refreshes queued
    fast, routed = await pair.both(ids_body(HOT), KEYED)
    assert fast.json()["users"][0]["source"] == "stale"
    assert raw(fast, own_id=False) == raw(routed, own_id=False)
    # Counted alike: the gateway's counts, the client's usage and the request metrics.
    for running in (pair.fast, pair.routed):
        await until_idle(running)
    assert counters(pair.fast) == counters(pair.routed)
    stats = [
        (await r.client.get("/api/stats", headers=KEYED)).json()["keys"]
        for r in (pair.fast, pair.routed)
    ]
    assert stats[0] == stats[1]
    assert await request_counts(pair.fast) == await request_counts(pair.routed)
    assert ("POST", "/api/users", "200") in await request_counts(pair.fast)


def counters(running: Running) -> dict[str, Any]:
    """The gateway's counts (upstream latencies, timings, left out)."""
    fields = dataclasses.asdict(running.gateway.stats)
    del fields["upstream_latencies"]
    return fields


async def until_idle(running: Running) -> None:
    assert await running.gateway.wait_idle(5)


async def request_counts(running: Running) -> dict[tuple[str, ...], float]:
    """Requests counted in /metrics by (method, route, status), /metrics itself left out."""
    text = (await running.client.get("/metrics")).text
    counts: dict[tuple[str, ...], float] = {}
    pattern = (
        r"gateway_http_request_duration_seconds_count"
        r'\{method="(\w+)",route="([^"]*)",status="(\d+)"\} (\S+)'
    )
    for method, route, status, count in re.findall(pattern, text):
        if route != "/metrics":
            counts[(method, route, status)] = float(count)
    return counts


async def test_a_fall_through_after_the_body_was_read_fetches_once_and_counts_once(
    start_app: StartApp, freelancer: FakeFreelancer, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await start_app(api_keys=KEYS)
    await running.client.post("/api/users", json={"user_ids": [1, 2]}, headers=KEYED)
    counts = taken(monkeypatch)
    answer = await running.client.post(
        "/api/users", content=ids_body([1, 2, 3, 4, 3]), headers=KEYED
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [u["user_id"] for u in body["users"]] == [1, 2, 3, 4]
    assert [u["source"] for u in body["users"]] == ["cache", "cache", "fetched", "fetched"]
    assert counts == {"fast": 1, "route": 0}, "the route finished what the edge started"
    assert freelancer.lookups == {1: 1, 2: 1, 3: 1, 4: 1}
    stats = running.gateway.stats
    assert (stats.requests, stats.ids_requested, stats.fetched) == (2, 6, 4)
    keys = (await running.client.get("/api/stats", headers=KEYED)).json()["keys"]
    usage = {row["name"]: row for row in keys}["reader"]
    # 3 requests (the /api/stats one too), ids counted once each request, 4 misses.
    assert (usage["requests"], usage["ids"], usage["misses"]) == (3, 6, 4)


async def test_a_client_past_its_ids_a_minute_gets_the_routes_429(
    start_app: StartApp, tmp_path: Path
) -> None:
    pair = await make_pair(start_app, tmp_path, rate_limit_ids_per_min=120)
    await warm(pair, list(range(1, 51)))
    answers = [await pair.both(ids_body(list(range(1, 51))), KEYED) for _ in range(2)]
    fast, routed = answers[-1]
    assert fast.status_code == 429, fast.text

    def masked(response: httpx.Response) -> tuple[Any, ...]:
        # The seconds to wait depend on when each app's window started.
        status, headers, content = raw(response, own_id=False)
        headers = [
            (n, re.sub(rb"\d+", b"N", v) if n != b"content-length" else v) for n, v in headers
        ]
        return status, headers, re.sub(rb"retry in \d+ s", b"retry in N s", content)

    assert masked(fast) == masked(routed)
    assert await request_counts(pair.fast) == await request_counts(pair.routed)


async def test_parallel_hits_and_misses_of_one_key_keep_its_miss_quota(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    freelancer.latency_s = 0.05
    running = await start_app(api_keys=KEYS, key_misses_per_min=33)  # 3 for the warm-up
    await running.client.post("/api/users", json={"user_ids": [1, 2, 3]}, headers=KEYED)
    batches = [[1, 2, 3, *range(1000 + 10 * i, 1010 + 10 * i)] for i in range(8)]
    answers = await asyncio.gather(
        *(running.client.post("/api/users", json={"user_ids": b}, headers=KEYED) for b in batches)
    )
    assert {a.status_code for a in answers} == {200}
    new = [uid for uid in freelancer.lookups if uid >= 1000]
    assert len(new) == 30, "the quota of 30 new ids holds across parallel requests"
    quota = [u for a in answers for u, why in a.json()["errors"].items() if why == "quota"]
    assert len(quota) == 50
    assert all([u["user_id"] for u in a.json()["users"]][:3] == [1, 2, 3] for a in answers)


async def test_a_body_in_several_messages_is_read_whole_and_a_client_that_left_is_not_answered(
    pair: Pair, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    await warm(pair, list(range(1, 51)))
    counts = taken(monkeypatch)
    body = ids_body([4, 5, 6])
    headers = [
        (b"host", b"localhost"),
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"x-api-key", KEY.encode()),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/users",
        "raw_path": b"/api/users",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }

    async def answer(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if parts:
                return parts.pop(0)
            await asyncio.sleep(3600)  # never: every part was already read
            raise AssertionError

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(dict(message))

        await pair.fast.app(dict(scope), receive, send)
        return sent

    split = [
        {"type": "http.request", "body": body[:7], "more_body": True},
        {"type": "http.request", "body": body[7:], "more_body": False},
    ]
    sent = await answer(split)
    assert sent[0]["status"] == 200
    assert [u["user_id"] for u in json.loads(sent[1]["body"])["users"]] == [4, 5, 6]
    assert counts == {"fast": 1, "route": 0}
    left: list[dict[str, Any]] = [
        {"type": "http.request", "body": body[:7], "more_body": True},
        {"type": "http.disconnect"},
    ]
    # The route reads what the fast path read, and finds the client gone: a 499, to no one,
    # counted as such; no error logged, none raised to the server (it was a logged 500).
    assert [m.get("status") for m in await answer(left)] == [499, None]
    assert counts == {"fast": 1, "route": 0}, "a lookup is not started for a client that left"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert (await request_counts(pair.fast)).get(("POST", "/api/users", "499")) == 1


async def test_an_unexpected_error_is_the_apps_logged_json_500_before_routing_as_after(
    pair: Pair, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The fast path runs outside FastAPI's error layer: a bug there must still answer the
    app's JSON 500 with the request id, logged, and count as a 500 of the route (before
    the edge caught it, the exception went to the server: a plain-text 500)."""

    def broken(user_ids: Any) -> Any:
        raise RuntimeError("a bug in the lookup")

    await warm(pair, HOT)
    answers = []
    for running in (pair.fast, pair.routed):
        monkeypatch.setattr(running.gateway, "lookup_now", broken)
        # The routed app's error layer answers, then re-raises for the server to log.
        transport = httpx.ASGITransport(app=running.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            headers = {**KEYED, "x-request-id": "bug-1"}
            answers.append(await client.post("/api/users", content=ids_body(HOT), headers=headers))
    fast, routed = answers
    assert fast.status_code == routed.status_code == 500
    internal = {"error": "internal_error", "detail": "internal error; see the log"}
    assert fast.json() == routed.json() == internal
    assert fast.headers["x-request-id"] == routed.headers["x-request-id"] == "bug-1"
    assert "a bug in the lookup" not in fast.text
    logged = [r for r in caplog.records if r.exc_info and "unexpected error" in r.getMessage()]
    assert len(logged) == 2, "each app logged its error once"
    assert (await request_counts(pair.fast))[("POST", "/api/users", "500")] == 1
