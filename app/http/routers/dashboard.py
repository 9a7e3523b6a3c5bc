"""The operators' live dashboard: `GET /dashboard`, its assets, and `GET /api/events`.

`/api/events` is a Server-Sent Events stream (`fastapi.sse`). On connect it
sends one `history` event, then one `sample` event a second:

    event: history
    data: {"interval_s": 1.0, "points": [{"t": ..., "requests_per_s": ..., ...}, ...]}

    event: sample
    id: 42
    data: {"seq": 42, "t": 1718000000.123, "requests_per_s": 12.0, "ids_per_s": 480.0, ...}

`points` are the last ten minutes of samples, each cut to the sampler's `POINT_FIELDS`; a
sample's fields are those `RateSampler.sample` builds (rates are null on the first sample after a
pause; ratios null when nothing was looked up). Its `jobs` object (null without a job
runner) has `by_status`, `ids_done_per_s` and up to five `active` jobs, read from the job
store by the hub (at most one read a tick; a store that is down gives an empty list).
The page reads the stream with `fetch()` so that it can send `X-API-Key` (EventSource
cannot send headers, and a key never goes in a URL).

The samples come from the lifespan's `DashboardHub` (`app.dashboard.hub`), one a second
for every open stream; a stream ends when its client disconnects, or when the hub closes
(the gateway stops, or the process was asked to exit).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from functools import cache
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.background import BackgroundTask

from app.dashboard.hub import DashboardHub
from app.errors import ShuttingDown, TooManyRequests
from app.http.dependencies import get_client
from app.http.state import services_of

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


def get_hub(request: Request) -> DashboardHub:
    """The running gateway's dashboard hub; 503 outside the lifespan."""
    hub = services_of(request.app).dashboard
    if hub is None:
        raise ShuttingDown("the gateway is not running")
    return hub


def encode_event(event: str, event_id: str | None, data: str) -> bytes:
    """One Server-Sent Event, as FastAPI writes them."""
    return format_sse_event(event=event, id=event_id, data_str=data)


@router.get("/api/events", include_in_schema=False)
async def events(
    request: Request, hub: Annotated[DashboardHub, Depends(get_hub)]
) -> EventSourceResponse:
    """The dashboard's stream: `history` once, then a `sample` every second; at most
    EVENTS_MAX_STREAMS_PER_KEY open at once per key (per address when open), 429 past it.

    Returned as an `EventSourceResponse` of pre-encoded events rather than through
    `response_class=EventSourceResponse` and a generator endpoint: FastAPI's keep-alive
    task then raises BrokenResourceError (logged as an unexpected error) when a client
    that stopped reading disconnects. Events come every second, so no keep-alive is needed.
    """
    services = services_of(request.app)
    client = get_client(request)
    most = services.settings.events_max_streams_per_key
    if services.streams.open(client.name) >= most:
        raise TooManyRequests(
            f"{client.name!r} has {most} event streams open, EVENTS_MAX_STREAMS_PER_KEY={most}: "
            "close one first",
            retry_after=1,
            limit_headers={},
        )
    frames = _frames(hub)
    services.streams.add(client.name, frames)
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
