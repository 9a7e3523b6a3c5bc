"""The edge (`GatewayMiddleware` in `EdgeApp`) under the scopes and faults a server gives it.

A server run with a root path (`uvicorn app.main:app --root-path /gw`, behind a proxy that
serves the gateway under /gw) sends, as ASGI says, the full path in `scope["path"]` and the
prefix in `scope["root_path"]`: the router matches the path without the prefix, and so
must everything the middleware judges by path (keys, limits, the body limit, metrics).

A bug in a route is logged once, by the app's error handler with the request's id, and
answered with its JSON 500: the server (a real uvicorn here) must not log it again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from app.logs import request_id
from app.main import create_app
from tests.support.apps import StartApp, make_settings, until
from tests.support.freelancer import FakeFreelancer
from tests.support.procs import free_port

KEY = "edge-key-0123456789abcdef"
KEYS = f"reader:{KEY}:read"
KEYED = {"x-api-key": KEY}
JSON_KEYED = {**KEYED, "content-type": "application/json"}
ROOT = "/gw"
"""Under a root path the route answers every lookup (the fast path leaves them to it)."""


def behind(app: object, root: str = ROOT) -> httpx.AsyncClient:
    """A client whose requests arrive as uvicorn's `--root-path` sends them."""
    transport = httpx.ASGITransport(app=app, root_path=root, raise_app_exceptions=False)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://localhost")


async def test_under_a_root_path_api_keys_and_the_metrics_key_are_required_as_without(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(api_keys=KEYS, metrics_require_key=True)
    async with behind(running.app) as client:
        body = {"user_ids": [1, 2]}
        keyless = await client.post(f"{ROOT}/api/users", json=body)
        assert keyless.status_code == 401, keyless.text
        assert keyless.json()["error"] == "unauthorized"
        keyed = await client.post(f"{ROOT}/api/users", json=body, headers={"x-api-key": KEY})
        assert keyed.status_code == 200, keyed.text
        assert [user["user_id"] for user in keyed.json()["users"]] == [1, 2]
        one = await client.get(f"{ROOT}/api/users/1", headers={"x-api-key": KEY})
        assert one.status_code == 200, one.text
        # METRICS_REQUIRE_KEY: the prefix is no way round the key.
        metrics = await client.get(f"{ROOT}/metrics")
        assert metrics.status_code == 401, metrics.text[:200]
        metrics = await client.get(f"{ROOT}/metrics", headers={"x-api-key": KEY})
        assert metrics.status_code == 200
    # Each request counted once, with the status the client saw (the refusals before
    # routing are "unmatched", as without a root path).
    counted = {
        labels: float(value)
        for line in metrics.text.splitlines()
        if line.startswith("gateway_http_request_duration_seconds_count{")
        for labels, value in [
            line.removeprefix("gateway_http_request_duration_seconds_count").split(" ")
        ]
    }
    assert counted == {
        '{method="POST",route="unmatched",status="401"}': 1.0,
        '{method="POST",route="/api/users",status="200"}': 1.0,
        '{method="GET",route="/api/users/{user_id}",status="200"}': 1.0,
        '{method="GET",route="unmatched",status="401"}': 1.0,
    }


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[tuple[uvicorn.Server, str]]:
    """`app` served by a real uvicorn on loopback, in this event loop (lifespan included)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    task = asyncio.create_task(server.serve())
    try:
        await until(lambda: server.started or task.done(), within_s=10)
        assert server.started, "uvicorn did not start"
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)


async def test_a_bug_in_a_route_is_logged_once_and_answered_with_the_json_500_once(
    tmp_path: Path, freelancer: FakeFreelancer, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(make_settings(tmp_path), upstream_transport=freelancer.transport)

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("a bug in a route")

    caplog.set_level(logging.INFO)
    # The request id each record of the app's is logged with (what `app.logs` prints).
    ids: list[tuple[str, str | None]] = []
    tagger = logging.Handler()
    tagger.emit = lambda record: ids.append((record.getMessage(), request_id.get()))  # type: ignore[method-assign]
    logging.getLogger("app").addHandler(tagger)
    try:
        async with serving(app) as (server, url), httpx.AsyncClient(base_url=url) as client:
            answer = await client.get("/bug", headers={"x-request-id": "bug-1"})
            # The server is done with the request (and has logged what it would) once no
            # request task is left.
            await until(lambda: not server.server_state.tasks, within_s=10)
            metrics = await client.get("/metrics")
    finally:
        logging.getLogger("app").removeHandler(tagger)
    assert answer.status_code == 500
    assert answer.json() == {"error": "internal_error", "detail": "internal error; see the log"}
    assert answer.headers["x-request-id"] == "bug-1"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [(r.name, r.getMessage()) for r in errors] == [
        ("app", "unexpected error serving GET /bug")
    ], [r.getMessage() for r in errors]
    assert errors[0].exc_info is not None, "the one log of it has the traceback"
    # Logged inside the request (the edge is outside FastAPI's error layer): with its id.
    assert ("unexpected error serving GET /bug", "bug-1") in ids, ids
    assert (
        'gateway_http_request_duration_seconds_count{method="GET",route="/bug",status="500"} 1.0'
        in metrics.text
    )


def lookup_scope(body: bytes, root: str = "") -> dict[str, Any]:
    """The scope uvicorn gives `POST /api/users` with a key and a JSON body of `body`."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": f"{root}/api/users",
        "raw_path": f"{root}/api/users".encode(),
        "query_string": b"",
        "root_path": root,
        "headers": [
            (b"host", b"localhost"),
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"x-api-key", KEY.encode()),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }


@pytest.mark.parametrize("root", ["", ROOT], ids=["answered at the edge", "by the route"])
async def test_a_send_that_fails_after_the_answer_started_never_starts_a_second_one(
    start_app: StartApp, freelancer: FakeFreelancer, root: str
) -> None:
    """ASGI lets `send` raise once the client is gone (OSError): the edge must not then
    start its own 500 on top of the 200 already sent, and counts what the client was sent."""
    running = await start_app(api_keys=KEYS)
    ids = [1, 2, 3]
    keyed = await running.client.post("/api/users", json={"user_ids": ids}, headers=KEYED)
    assert keyed.status_code == 200
    body = json.dumps({"user_ids": ids}).encode()
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(30)  # never: the body was read whole
        raise AssertionError

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))
        if message["type"] == "http.response.body":
            raise OSError("the client is gone")

    with pytest.raises(OSError):  # the answer was cut short: the server's to see
        await running.app(lookup_scope(body, root), receive, send)
    starts = [m["status"] for m in sent if m["type"] == "http.response.start"]
    assert starts == [200], sent


def request_counts(metrics: str) -> dict[str, float]:
    """`gateway_http_request_duration_seconds_count` by its labels."""
    prefix = "gateway_http_request_duration_seconds_count"
    counts = {}
    for line in metrics.splitlines():
        if line.startswith(prefix + "{"):
            labels, value = line.removeprefix(prefix).split(" ")
            counts[labels] = float(value)
    return counts


async def chunks(size: int) -> AsyncIterator[bytes]:
    """A body sent without a Content-Length, in 4 KiB parts."""
    for _ in range(size // 4096 + 1):
        yield b"x" * 4096


@pytest.mark.parametrize(
    ("method", "path", "options", "status", "route"),
    [
        ("GET", "/nowhere", {}, 404, "unmatched"),
        ("GET", "/api/users/1", {"headers": {}}, 401, "unmatched"),
        ("PUT", "/api/users", {}, 405, "/api/users"),
        ("OPTIONS", "/api/users", {}, 405, "/api/users"),
        ("HEAD", "/api/users/1", {}, 405, "/api/users/{user_id}"),
        ("POST", "/api/users", {"content": b"x" * 70_000, "headers": JSON_KEYED}, 413, "unmatched"),
        ("POST", "/api/users", {"content": "chunked", "headers": JSON_KEYED}, 413, "/api/users"),
        ("GET", "/docs", {}, 200, "/docs"),
        ("GET", "/dashboard", {}, 200, "/dashboard"),
    ],
)
async def test_every_answer_has_the_request_id_a_json_error_and_is_counted_once(
    start_app: StartApp,
    freelancer: FakeFreelancer,
    method: str,
    path: str,
    options: dict[str, Any],
    status: int,
    route: str,
) -> None:
    running = await start_app(api_keys=KEYS, max_body_bytes=64 * 1024)
    client = running.client
    before = request_counts((await client.get("/metrics")).text)
    headers = {"x-request-id": "edge-1", **options.get("headers", KEYED)}
    content = options.get("content")
    if content == "chunked":
        content = chunks(70_000)
    answer = await client.request(method, path, headers=headers, content=content)
    after = request_counts((await client.get("/metrics")).text)
    assert answer.status_code == status, answer.text
    assert answer.headers["x-request-id"] == "edge-1"
    if status >= 400 and method != "HEAD":
        assert answer.headers["content-type"] == "application/json"
        assert answer.json()["error"]
    scrape = '{method="GET",route="/metrics",status="200"}'
    changed = {
        labels: count - before.get(labels, 0)
        for labels, count in after.items()
        if count != before.get(labels, 0) and labels != scrape
    }
    assert changed == {f'{{method="{method}",route="{route}",status="{status}"}}': 1.0}
