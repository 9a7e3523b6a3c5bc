"""The live dashboard in-process: its page and assets, the `/api/events` stream, one shared
sampler, and streams that end cleanly (client gone, gateway stopped, server exiting)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import orjson
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from starlette.types import ASGIApp, Message

from app.dashboard import hub as dashboard
from app.dashboard.hub import DashboardHub
from app.dashboard.sampler import POINT_FIELDS, JobsNow, RateSampler, percentile
from app.errors import StoreUnavailable
from app.http.state import services_of
from app.jobs import runner as job_runner
from app.main import create_app
from tests.support.apps import Running, StartApp, make_settings, until
from tests.support.freelancer import FakeFreelancer

SAMPLE_FIELDS = {
    "seq",
    "t",
    "interval_s",
    "requests_per_s",
    "ids_per_s",
    "coalesced_per_s",
    "hit_ratio",
    "requests_total",
    "ids_total",
    "coalesced_total",
    "hit_ratio_total",
    "queue",
    "queue_limit",
    "in_flight",
    "upstream_calls_per_s",
    "upstream_calls_total",
    "upstream_errors_total",
    "upstream_calls_last_minute",
    "upstream_calls_last_hour",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_samples",
    "upstream_state",
    "breaker",
    "throttled",
    "throttle_wait_s",
    "budget",
    "budget_waiting",
    "store",
    "store_size",
    "memory_size",
    "refresh_ahead",
    "keys",
    "jobs",
}
FRAME_LINE = re.compile(r"(event|data|id|retry): ?(.*)|:.*")


@pytest.fixture(autouse=True)
def _fast_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample every 50 ms and a store count every 100 ms: streams show changes quickly."""
    monkeypatch.setattr(dashboard, "TICK_S", 0.05)
    monkeypatch.setattr(dashboard, "STORE_COUNT_S", 0.1)


class Stream:
    """An in-process `GET /api/events`, the ASGI app called directly.

    httpx's ASGITransport returns only once the whole body is sent, which a stream never
    is; here each body chunk arrives as it is sent, and `disconnect()` is what a server
    tells the app when the client goes away.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        stalled: bool = False,
        headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
        status: int = 200,
    ) -> None:
        self.app = app
        self.stalled = stalled
        self.headers = list(headers)
        self.status = status
        """The status the stream is expected to open with."""
        self.body = b""
        """A client that never reads: every body chunk's `send` blocks."""
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.gone = asyncio.Event()
        self.buffer = b""
        self.finished = False
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> Stream:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/api/events",
            "raw_path": b"/api/events",
            "root_path": "",
            "query_string": b"",
            "headers": [
                (b"host", b"localhost"),
                (b"accept", b"text/event-stream"),
                *self.headers,
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("localhost", 80),
        }
        requested = False

        async def receive() -> Message:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await self.gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if self.stalled and message["type"] == "http.response.body":
                await asyncio.Event().wait()  # until the app cancels it
            await self.messages.put(message)

        async def call() -> None:
            await self.app(scope, receive, send)

        self.task = asyncio.create_task(call(), name="test-stream")
        start = await asyncio.wait_for(self.messages.get(), 5)
        assert start["type"] == "http.response.start"
        assert start["status"] == self.status, start
        headers = dict(start["headers"])
        if self.status != 200:  # an error: its whole body, and the call returns
            self.body = (await asyncio.wait_for(self.messages.get(), 5)).get("body", b"")
            await asyncio.wait_for(self.task, 5)
            return self
        assert headers[b"content-type"].startswith(b"text/event-stream")
        assert headers[b"cache-control"] == b"no-cache"
        return self

    async def frame(self, within_s: float = 5.0) -> dict[str, Any]:
        """The next frame as {field: value}, every line of it checked to be well formed."""
        while b"\n\n" not in self.buffer:
            message = await asyncio.wait_for(self.messages.get(), within_s)
            assert message["type"] == "http.response.body"
            self.buffer += message.get("body", b"")
            if not message.get("more_body", False):
                self.finished = True
                raise EOFError("the stream ended")
        block, self.buffer = self.buffer.split(b"\n\n", 1)
        fields: dict[str, Any] = {}
        for line in block.decode().split("\n"):
            match = FRAME_LINE.fullmatch(line)
            assert match, f"malformed SSE line {line!r}"
            if match.group(1):
                assert match.group(1) not in fields, f"repeated field in {block!r}"
                fields[match.group(1)] = match.group(2)
        if "data" in fields:
            fields["data"] = orjson.loads(fields["data"])
        return fields

    async def sample(self, within_s: float = 5.0) -> dict[str, Any]:
        """The next `sample` event's data."""
        while True:
            frame = await self.frame(within_s)
            if frame.get("event") == "sample":
                assert frame["id"] == str(frame["data"]["seq"])
                data: dict[str, Any] = frame["data"]
                return data

    async def sample_where(
        self, condition: Callable[[dict[str, Any]], bool], within_s: float = 5.0
    ) -> dict[str, Any]:
        """The first sample for which `condition` holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while True:
            sample = await self.sample(max(0.01, deadline - loop.time()))
            if condition(sample):
                return sample

    async def until_ended(self, within_s: float = 5.0) -> None:
        """Read until the app sends the last body chunk, then its call returns."""
        with pytest.raises(EOFError):
            while True:
                await self.frame(within_s)
        assert self.task is not None
        await asyncio.wait_for(self.task, within_s)

    async def disconnect(self) -> None:
        """The client goes away: the app's call must return."""
        self.gone.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)


def hub_of(running: Running) -> DashboardHub:
    """The running app's dashboard hub."""
    hub = services_of(running.app).dashboard
    assert hub is not None
    return hub


def dashboard_tasks() -> list[asyncio.Task[Any]]:
    """Tasks the dashboard or a test stream started that have not finished."""
    names = ("dashboard-", "test-stream")
    return [t for t in asyncio.all_tasks() if t.get_name().startswith(names) and not t.done()]


def assert_no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR
        or (r.levelno >= logging.WARNING and r.name in ("app.dashboard", "asyncio"))
    ]
    assert not errors, [r.getMessage() for r in errors]


class AssetLinks(HTMLParser):
    """Every `src` and `href` in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls.extend(value for name, value in attrs if name in ("src", "href") and value)


async def test_the_page_and_every_asset_it_names_are_served(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    page = await running.client.get("/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    parser = AssetLinks()
    parser.feed(page.text)
    assets = [url for url in parser.urls if not url.startswith("data:")]
    assert {"/dashboard/dashboard.js", "/dashboard/dashboard.css"} <= set(assets), assets
    bodies = [page.text]
    for url in assets:
        response = await running.client.get(url)
        assert response.status_code == 200, url
        kind = "text/javascript" if url.endswith(".js") else "text/css"
        assert response.headers["content-type"].startswith(kind), url
        bodies.append(response.text)
    for body in bodies:  # self-contained: no CDN, no web font, nothing off this origin
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import|url\(", body)
    script = bodies[assets.index("/dashboard/dashboard.js") + 1]
    # The key travels in a header, never in storage or a URL; EventSource cannot send it.
    assert '"X-API-Key"' in script
    assert "localStorage" not in script and "sessionStorage" not in script
    assert "new EventSource" not in script
    missing = await running.client.get("/dashboard/nope.js")
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"
    paths = (await running.client.get("/openapi.json")).json()["paths"]
    assert "/api/events" not in paths and "/dashboard" not in paths


async def test_events_are_well_formed_and_counters_move_after_a_lookup(
    start_app: StartApp, freelancer: FakeFreelancer, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_app()
    stream = await Stream(running.app).open()
    history = await stream.frame()
    assert history["event"] == "history"
    assert history["data"]["interval_s"] == dashboard.TICK_S
    assert isinstance(history["data"]["points"], list)
    first = await stream.sample()
    assert set(first) == SAMPLE_FIELDS
    assert first["requests_total"] == 0 and first["upstream_calls_total"] == 0
    assert first["upstream_state"] == "ok" and first["breaker"] == "closed"
    assert first["store"] == "sqlite" and isinstance(first["keys"], list)
    assert first["budget"][0]["name"] == "minute"
    assert set(first["budget"][0]) == {
        "name",
        "period_s",
        "margin_s",
        "limit",
        "used",
        "remaining",
        "next_call_in_s",
    }

    assert first["refresh_ahead"] == {
        "enabled": True,
        "calls_total": 0,
        "ids_total": 0,
        "stale_popular_total": 0,
        "stale_other_total": 0,
        "popular": 0,
        "coverage": 1.0,
    }

    await running.lookup(1, 2, 3)
    moved = await stream.sample_where(lambda s: s["upstream_calls_total"] == 1)
    assert moved["requests_total"] == 1 and moved["ids_total"] == 3
    assert moved["upstream_calls_last_minute"] == 1 and moved["budget"][0]["used"] == 1
    assert moved["latency_p50_ms"] is not None and moved["latency_samples"] == 1
    assert moved["hit_ratio_total"] == 0.0
    await running.lookup(1, 2, 3)
    cached = await stream.sample_where(lambda s: s["requests_total"] == 2)
    assert cached["hit_ratio_total"] == 0.5
    assert cached["upstream_calls_total"] == 1  # answered from the cache
    sized = await stream.sample_where(lambda s: s["store_size"] == 3)
    assert sized["memory_size"] == 3
    later = await Stream(running.app).open()
    points = (await later.frame())["data"]["points"]
    assert points and set(points[-1]) == set(POINT_FIELDS)
    assert sum(p["ids_per_s"] or 0 for p in points) > 0  # the lookups are in the history
    await later.disconnect()
    await stream.disconnect()
    assert_no_errors_logged(caplog)


async def test_per_key_usage_comes_from_the_apps_key_usage(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    usage = [{"name": "ops", "requests": 3, "ids": 30, "misses": 2}]
    hub_of(running).key_usage = lambda: usage
    stream = await Stream(running.app).open()
    first = await stream.sample()
    assert first["keys"] == [
        {"name": "ops", "requests": 3, "ids": 30, "misses": 2, "requests_per_s": None}
    ]
    usage = [{"name": "ops", "requests": 13, "ids": 30, "misses": 2}]
    moved = await stream.sample_where(lambda s: s["keys"][0]["requests"] == 13)
    assert moved["keys"][0]["requests_per_s"] > 0
    hub_of(running).key_usage = None  # no provider: an empty list
    assert (await stream.sample_where(lambda s: s["keys"] == []))["keys"] == []
    await stream.disconnect()


async def test_one_sample_a_tick_is_shared_by_every_stream(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(events_max_streams_per_key=10)
    streams = [await Stream(running.app).open() for _ in range(10)]
    seen: list[dict[int, str]] = []
    for stream in streams:
        await stream.frame()  # history
    for stream in streams:
        frames: dict[int, str] = {}
        while len(frames) < 5:
            sample = await stream.sample()
            frames[sample["seq"]] = orjson.dumps(sample).decode()
        seen.append(frames)
    hub = hub_of(running)
    assert hub.streams == 10
    # One computation per tick for all ten: the sample count is the sequence number,
    # and streams that saw the same tick saw the same sample.
    newest = max(seq for frames in seen for seq in frames)
    assert hub.samples_taken == hub.sampler.seq >= newest
    assert hub.samples_taken < 5 + 10  # ten streams did not mean ten samplers
    for seq in seen[0]:
        assert len({frames[seq] for frames in seen if seq in frames}) == 1
    for stream in streams:
        await stream.disconnect()
    await until(lambda: not dashboard_tasks())


async def test_a_client_that_disconnects_leaves_no_task(
    start_app: StartApp, freelancer: FakeFreelancer, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_app()
    hub = hub_of(running)
    first = await Stream(running.app).open()
    second = await Stream(running.app).open()
    await first.sample()
    await second.sample()
    await first.disconnect()
    assert hub.streams == 1 and hub.running
    await second.sample()  # the other stream goes on
    await second.disconnect()
    assert hub.streams == 0
    await until(lambda: not dashboard_tasks(), within_s=2)
    assert not hub.running
    again = await Stream(running.app).open()  # and it starts again on demand
    await again.sample()
    await again.disconnect()
    await until(lambda: not dashboard_tasks(), within_s=2)
    assert_no_errors_logged(caplog)


async def test_a_client_gone_while_its_sample_is_unread_leaves_no_task(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """The stream is parked at a `yield` (its reader never read) when the client goes."""
    running = await start_app()
    stream = await Stream(running.app, stalled=True).open()
    await until(lambda: hub_of(running).samples_taken >= 5)
    await stream.disconnect()
    assert hub_of(running).streams == 0  # closed as the response ended
    await until(lambda: not dashboard_tasks(), within_s=2)


async def test_streams_end_when_the_app_shuts_down(
    tmp_path: Path, freelancer: FakeFreelancer, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(make_settings(tmp_path), upstream_transport=freelancer.transport)
    async with LifespanManager(app) as manager:
        streams = [await Stream(manager.app).open() for _ in range(3)]
        for stream in streams:
            await stream.sample()
    for stream in streams:  # no disconnect: each ends by itself
        await stream.until_ended()
    await until(lambda: not dashboard_tasks(), within_s=2)
    assert_no_errors_logged(caplog)


async def test_streams_end_as_soon_as_the_process_is_asked_to_exit(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    # A server waits for open responses before it runs the lifespan's shutdown: the
    # streams must end on SIGTERM itself, and the server's own handler must still run.
    received: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda sig, frame: received.append(sig))
    try:
        running = await start_app()
        stream = await Stream(running.app).open()
        await stream.sample()
        os.kill(os.getpid(), signal.SIGTERM)
        await stream.until_ended()
        assert received == [signal.SIGTERM]  # the handler that was there ran too
        await until(lambda: not dashboard_tasks(), within_s=2)
    finally:
        signal.signal(signal.SIGTERM, before)


async def test_events_answer_503_outside_the_lifespan(tmp_path: Path) -> None:
    app: FastAPI = create_app(make_settings(tmp_path))
    stream = Stream(app)
    with pytest.raises(AssertionError, match="503"):
        await stream.open()
    assert stream.task is not None
    await stream.task


async def test_latencies_are_kept_out_of_api_stats(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running: Running = await start_app()
    await running.lookup(7)
    assert len(running.gateway.stats.upstream_latencies) == 1
    stats = (await running.client.get("/api/stats")).json()
    assert "upstream_latencies" not in stats
    assert stats["upstream_calls"] == 1


def test_percentiles() -> None:
    assert percentile([], 0.5) is None
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.95) == 95.0
    assert percentile([3.0], 0.95) == 3.0


async def test_the_budget_shown_is_the_logs_calls_made_while_no_dashboard_was_open(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """The page once counted only the calls it saw ("per hour covers the last 0 s")."""
    running = await start_app(upstream_rate_per_min=3, upstream_reserve_per_min=1)
    for uid in (1, 2, 3):  # three calls, the minute's whole limit, before any dashboard
        await running.lookup(uid)
    metrics = (await running.client.get("/metrics")).text  # no dashboard needed either
    assert 'gateway_budget_used{window="minute"} 3.0' in metrics
    assert 'gateway_budget_remaining{window="minute"} 0.0' in metrics
    next_call = re.search(r'gateway_budget_next_call_in_seconds\{window="minute"\} (\S+)', metrics)
    assert next_call is not None and 59 < float(next_call.group(1)) <= 61
    stream = await Stream(running.app).open()
    sample = await stream.sample()
    minute = next(w for w in sample["budget"] if w["name"] == "minute")
    assert (minute["limit"], minute["used"], minute["remaining"]) == (3, 3, 0)
    assert 59 < minute["next_call_in_s"] <= 61, "until the first call leaves the minute"
    assert (sample["upstream_calls_last_minute"], sample["upstream_calls_last_hour"]) == (3, 3)
    await stream.disconnect()


async def test_the_jobs_panel_lists_jobs_waiting_for_the_budget_and_what_they_wait_for(
    start_app: StartApp, freelancer: FakeFreelancer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """12 jobs behind an exhausted minute (the issue's 44 said "No active jobs"): the counts
    move while the runner waits, the list shows 10 and how many more, and each job says
    what it waits for: the minute window (its chunks are in line) or other jobs."""
    monkeypatch.setattr(job_runner, "STATUS_EVERY_S", 0.1)
    running = await start_app(
        upstream_rate_per_min=3, upstream_reserve_per_min=1, upstream_concurrency=2
    )
    for n in range(12):
        body = {"user_ids": list(range(n * 1000 + 1, n * 1000 + 301)), "label": f"j{n}"}
        assert (await running.client.post("/api/jobs", json=body)).status_code == 202
    stream = await Stream(running.app).open()

    def waiting(s: dict[str, Any]) -> bool:
        jobs = s["jobs"]
        statuses = jobs["by_status"]
        return (
            statuses.get("pending", 0) + statuses.get("running", 0) == 12
            and jobs["active"] is not None
            and any(j["waiting_for"] == "minute" for j in jobs["active"])
        )

    jobs = (await stream.sample_where(waiting, within_s=10))["jobs"]
    assert jobs["active_total"] == 12 and len(jobs["active"]) == 10
    held = [j for j in jobs["active"] if j["waiting_for"] == "minute"]
    assert len(held) == 1, "one chunk in line (UPSTREAM_CONCURRENCY - 1), held by the minute"
    assert 50 < held[0]["waiting_in_s"] <= 61
    assert all(j["waiting_for"] == "other jobs" for j in jobs["active"] if j not in held)
    health = (await running.client.get("/")).json()
    assert health["budget_waiting"][0]["lane"] == "jobs"
    assert health["budget_waiting"][0]["waits_for"] == "minute"
    metrics = (await running.client.get("/metrics")).text
    assert 'gateway_budget_lane_waiting_seconds{lane="jobs",waits_for="minute"}' in metrics
    await stream.disconnect()


async def test_samples_carry_active_jobs_and_their_counts(
    start_app: StartApp,
    freelancer: FakeFreelancer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(job_runner, "STATUS_EVERY_S", 0.0)  # counts each runner round
    running = await start_app()
    stream = await Stream(running.app).open()
    assert (await stream.sample_where(lambda s: s["jobs"]["active"] is not None))["jobs"][
        "active"
    ] == []
    freelancer.gate = asyncio.Event()  # fetches block: the job stays active
    submitted = await running.client.post("/api/jobs", json={"user_ids": [1, 2, 3], "label": "x"})
    assert submitted.status_code == 202
    job_id = submitted.json()["job_id"]

    def active(s: dict[str, Any]) -> bool:
        by_status = s["jobs"]["by_status"]
        return (
            bool(s["jobs"]["active"])
            and by_status.get("pending", 0) + by_status.get("running", 0) == 1
        )

    busy = (await stream.sample_where(active, within_s=10))["jobs"]
    [job] = busy["active"]
    assert (
        job["job_id"] == job_id and job["label"] == "x" and job["status"] in ("pending", "running")
    )
    assert (job["done"], job["total"]) == (0, 3) and "eta_s" in job
    freelancer.gate.set()
    done = await stream.sample_where(
        lambda s: s["jobs"]["by_status"] == {"completed": 1} and s["jobs"]["active"] == [],
        within_s=10,
    )
    assert done["jobs"]["ids_done_per_s"] is not None
    runner = services_of(running.app).runner
    assert runner is not None and runner.ids_done == 3

    async def down() -> list[Any]:
        raise StoreUnavailable("the job store is down")

    monkeypatch.setattr(runner.store, "active", down)
    freelancer.gate = asyncio.Event()
    assert (await running.client.post("/api/jobs", json={"user_ids": [4]})).status_code == 202
    later = await stream.sample_where(lambda s: s["seq"] > done["seq"] + 5)
    assert later["jobs"]["active"] == []  # the store is down: no list, the stream goes on
    freelancer.gate.set()
    hub_of(running).runner = None
    await stream.sample_where(lambda s: s["jobs"] is None)  # no runner: null
    hub_of(running).runner = runner
    await stream.disconnect()
    assert_no_errors_logged(caplog)


async def test_job_ids_done_per_second_over_the_sample_interval(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    sampler = RateSampler(clock=iter([10.0, 12.0, 13.0]).__next__)
    first = sampler.sample(running.gateway, store_size=None, jobs=JobsNow({"running": 1}, 100))
    assert first["jobs"] == {
        "by_status": {"running": 1},
        "ids_done_per_s": None,
        "active": [],
        "active_total": None,
    }
    active = [{"job_id": "j", "done": 30, "total": 40}]
    second = sampler.sample(running.gateway, store_size=None, jobs=JobsNow({}, 130, active, 1))
    assert second["jobs"] == {
        "by_status": {},
        "ids_done_per_s": 15.0,
        "active": active,
        "active_total": 1,
    }
    assert sampler.sample(running.gateway, store_size=None)["jobs"] is None


async def test_a_key_may_hold_a_few_streams_and_gets_429_past_them(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """Each stream holds a task and a sample a second: EVENTS_MAX_STREAMS_PER_KEY bounds
    them per key (per address when open); a stream that ends frees its place."""
    running = await start_app(
        events_max_streams_per_key=2,
        api_keys="ops:ops-key-0123456789abcdef,other:other-key-0123456789abcdef",
    )
    ops = [(b"x-api-key", b"ops-key-0123456789abcdef")]
    streams = [await Stream(running.app, headers=ops).open() for _ in range(2)]
    refused = await Stream(running.app, headers=ops, status=429).open()
    body = orjson.loads(refused.body)
    assert body["error"] == "rate_limited"
    assert "EVENTS_MAX_STREAMS_PER_KEY=2" in body["detail"]
    other = [(b"x-api-key", b"other-key-0123456789abcdef")]
    elsewhere = await Stream(running.app, headers=other).open()  # another key's own share
    await streams[0].disconnect()
    again = await Stream(running.app, headers=ops).open()
    for stream in (streams[1], elsewhere, again):
        await stream.disconnect()
    await until(lambda: not dashboard_tasks(), within_s=2)
