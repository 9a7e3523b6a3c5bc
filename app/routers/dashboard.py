"""The operators' live dashboard: `GET /dashboard`, its assets, and `GET /api/events`.

`/api/events` is a Server-Sent Events stream (`fastapi.sse`). On connect it
sends one `history` event, then one `sample` event a second:

    event: history
    data: {"interval_s": 1.0, "points": [{"t": ..., "requests_per_s": ..., ...}, ...]}

    event: sample
    id: 42
    data: {"seq": 42, "t": 1718000000.123, "requests_per_s": 12.0, "ids_per_s": 480.0, ...}

`points` are the last ten minutes of samples, each cut to `rates.POINT_FIELDS`; a sample's
fields are those `RateSampler.sample` builds (rates are null on the first sample after a
pause; ratios null when nothing was looked up). Its `jobs` object (null without a job
runner) has `by_status`, `ids_done_per_s` and up to five `active` jobs, read from the job
store by the hub (at most one read a tick; a store that is down gives an empty list).
The page reads the stream with `fetch()` so that it can send `X-API-Key` (EventSource
cannot send headers, and a key never goes in a URL).

One `DashboardHub` per app computes one sample a second, serialized once, for every open
stream; it runs only while a stream is open, so no lifespan hook is needed. A stream ends
when its client disconnects, when the gateway stops, or when uvicorn is shutting down
(uvicorn waits for open responses to finish before it runs the lifespan's shutdown, so
the hub watches uvicorn's exit flag rather than waiting for the gateway to stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, HTTPException, Request, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.background import BackgroundTask

from app.dependencies import GatewayDep
from app.errors import StoreUnavailable
from app.gateway import Gateway
from app.gateway.rates import JobsNow, RateSampler
from app.jobs.model import Job
from app.jobs.runner import JobRunner

log = logging.getLogger("app.dashboard")

TICK_S = 1.0
"""Seconds between samples (tests shorten it)."""
STORE_COUNT_S = 5.0
"""Seconds between two counts of the store's users (a count may scan a large table)."""
ACTIVE_JOBS_SHOWN = 5
"""Active jobs a sample lists (running first, then by priority and age)."""

ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
PAGE_HEADERS = {
    # Everything the page uses is served from here: no CDN, no inline script or style.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(tags=["dashboard"])


@dataclass(frozen=True, slots=True)
class Frame:
    """One sample, encoded as an SSE event once for every stream."""

    seq: int
    event: bytes


class DashboardHub:
    """Samples the gateway once a second while at least one stream is open.

    Streams wait on `next_frame`; the sampler task is started by the first `attach` and
    returns once the last `detach` wakes it, so nothing runs while no dashboard is open.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.loop = asyncio.get_running_loop()
        self.sampler = RateSampler()
        self.samples_taken = 0
        self.closing = False
        self._streams = 0
        self._latest: Frame | None = None
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._count_task: asyncio.Task[None] | None = None
        self._store_size: int | None = None
        self._store_counted_at = float("-inf")
        self._jobs_task: asyncio.Task[None] | None = None
        self._jobs_read: tuple[JobRunner, list[Job]] | None = None
        self._server = _uvicorn_server()

    @property
    def streams(self) -> int:
        """Streams open now."""
        return self._streams

    @property
    def running(self) -> bool:
        """Whether the sampler task exists and has not finished."""
        return self._task is not None and not self._task.done()

    def attach(self) -> None:
        """A stream opened: start sampling if it is the first."""
        self._streams += 1
        self.closing = self._stopping()
        if not self.running:
            self._task = asyncio.create_task(self._run(), name="dashboard-sampler")

    def detach(self) -> None:
        """A stream closed (synchronous: it runs while the stream is being cancelled).

        The last one wakes the sampler, which then sees no stream and returns: it is never
        cancelled, so a stream attaching meanwhile finds it still running, and no await
        separates its last look at the streams from its end.
        """
        self._streams -= 1
        if self._streams <= 0:
            self._wake.set()

    def history(self) -> str:
        """The `history` event's data: the chart points kept."""
        points = list(self.sampler.points)
        return orjson.dumps({"interval_s": TICK_S, "points": points}).decode()

    async def next_frame(self, after: int) -> Frame | None:
        """The newest frame later than `after`, waiting for one; None once closing."""
        while not self.closing:
            latest = self._latest
            if latest is not None and latest.seq > after:
                return latest
            await self._changed.wait()
        return None

    def _stopping(self) -> bool:
        return self.app.state.gateway is None or bool(getattr(self._server, "should_exit", False))

    def _publish(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _run(self) -> None:
        next_at = self.loop.time()
        failing = False
        while self._streams > 0:
            delay = next_at - self.loop.time()
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                continue
            if self._stopping():
                self.closing = True
                self._publish()
                return
            try:
                self._tick(self.app.state.gateway)
                failing = False
            except Exception:  # a bug here must not stop every open dashboard
                if not failing:  # once, not once a second
                    log.exception("the dashboard's sample failed")
                failing = True
            next_at = max(next_at + TICK_S, self.loop.time())

    def _tick(self, gateway: Gateway) -> None:
        """Take one sample and hand it to every stream."""
        self._count_store(gateway)
        sample = self.sampler.sample(
            gateway,
            store_size=self._store_size,
            key_usage=self._key_usage(),
            jobs=self._jobs_now(),
        )
        self.samples_taken += 1
        seq = sample["seq"]
        data = orjson.dumps(sample).decode()
        self._latest = Frame(seq, format_sse_event(event="sample", id=str(seq), data_str=data))
        self._publish()

    def _count_store(self, gateway: Gateway) -> None:
        """Start a count of the store's users, at most every STORE_COUNT_S, never two at once."""
        now = self.loop.time()
        if now - self._store_counted_at < STORE_COUNT_S:
            return
        if self._count_task is not None and not self._count_task.done():
            return
        self._store_counted_at = now
        self._count_task = asyncio.create_task(self._count(gateway), name="dashboard-count")

    async def _count(self, gateway: Gateway) -> None:
        try:
            self._store_size = await gateway.store.count()
        except StoreUnavailable:
            self._store_size = None
        except Exception:  # a store closing under us at shutdown: no number, no noise
            log.debug("counting the store's users failed", exc_info=True)
            self._store_size = None

    def _jobs_now(self) -> JobsNow | None:
        """The runner's counters, and the active jobs of the latest store read (one read
        is started per tick at most, never two at once, so a slow store never holds the
        stream up); None when no runner exists."""
        runner: JobRunner | None = getattr(self.app.state, "jobs", None)
        if runner is None:
            return None
        if self._jobs_task is None or self._jobs_task.done():
            self._jobs_task = asyncio.create_task(self._read_jobs(runner), name="dashboard-jobs")
        read = self._jobs_read
        jobs = read[1] if read is not None and read[0] is runner else []
        jobs = sorted(jobs, key=lambda job: (job.status != "running", job.rank, job.job_id))
        active = [
            {
                "job_id": job.job_id,
                "label": job.label,
                "status": job.status,
                "done": job.done,
                "total": job.total,
                "eta_s": runner.eta_s(job),
            }
            for job in jobs[:ACTIVE_JOBS_SHOWN]
        ]
        return JobsNow(by_status=runner.by_status, ids_done=runner.ids_done, active=active)

    async def _read_jobs(self, runner: JobRunner) -> None:
        try:
            jobs = await runner.store.active()
        except StoreUnavailable:
            jobs = []
        except Exception:  # a store closing under us at shutdown: no jobs, no noise
            log.debug("reading the active jobs failed", exc_info=True)
            jobs = []
        self._jobs_read = (runner, jobs)

    def _key_usage(self) -> list[Mapping[str, Any]]:
        usage = getattr(self.app.state, "key_usage", None)
        if usage is None:
            return []
        try:
            return list(usage())
        except Exception:
            log.warning("key usage could not be read for the dashboard", exc_info=True)
            return []


def _uvicorn_server() -> object | None:
    """The uvicorn `Server` running this app, if any: its SIGTERM handler is its method."""
    handler = signal.getsignal(signal.SIGTERM)
    server = getattr(handler, "__self__", None)
    return server if hasattr(server, "should_exit") else None


def hub_for(app: FastAPI) -> DashboardHub:
    """The app's hub, made on first use (one per app and event loop)."""
    hub: DashboardHub | None = getattr(app.state, "dashboard_hub", None)
    if hub is None or hub.loop is not asyncio.get_running_loop():
        hub = DashboardHub(app)
        app.state.dashboard_hub = hub
    return hub


@router.get("/api/events", include_in_schema=False)
async def events(request: Request, gateway: GatewayDep) -> EventSourceResponse:
    """The dashboard's stream: `history` once, then a `sample` every second.

    Returned as an `EventSourceResponse` of pre-encoded events rather than through
    `response_class=EventSourceResponse` and a generator endpoint: FastAPI's keep-alive
    task then raises BrokenResourceError (logged as an unexpected error) when a client
    that stopped reading disconnects. Events come every second, so no keep-alive is needed.
    """
    frames = _frames(hub_for(request.app))
    # aclose: the generator's `finally` runs even when the client left while it was
    # parked at a `yield` (its send blocked), not whenever it is garbage-collected.
    return EventSourceResponse(
        frames,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(_close, frames),
    )


async def _close(frames: AsyncGenerator[bytes, None]) -> None:
    # An async function: Starlette runs any other callable (a bound `aclose`) in a thread.
    await frames.aclose()


async def _frames(hub: DashboardHub) -> AsyncGenerator[bytes, None]:
    hub.attach()
    try:
        yield format_sse_event(event="history", data_str=hub.history())
        seq = 0
        while (frame := await hub.next_frame(seq)) is not None:
            seq = frame.seq
            yield frame.event
    finally:
        hub.detach()


@cache
def _asset(name: str) -> bytes:
    return resources.files("app.dashboard").joinpath(name).read_bytes()


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> Response:
    """The live dashboard page."""
    return Response(_asset("index.html"), media_type="text/html", headers=PAGE_HEADERS)


@router.get("/dashboard/{name}", include_in_schema=False)
async def dashboard_asset(name: str) -> Response:
    """The page's script and stylesheet."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404, detail=f"no dashboard asset {name!r}")
    return Response(_asset(name), media_type=media_type, headers=PAGE_HEADERS)
