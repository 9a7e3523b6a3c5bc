"""For scale: a bare FastAPI route, or a bare ASGI callable, answering a fixed body,
served with the gateway's flags.

The body is the gateway's own answer to one hot batch (same size, same bytes), and uvicorn
runs as `python -m app serve` runs it, start-up objects frozen out of the GC included.
The bare callable (`--bare`) is the floor: uvicorn's own cost for a request and a 14 KB
answer, with no framework at all.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Receive, Scope, Send


def create_app(body: bytes) -> FastAPI:
    """The trivial app: read the request body, answer the same bytes every time."""
    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/users")
    async def users(request: Request) -> Response:
        await request.body()
        return Response(body, media_type="application/json")

    return app


def bare_app(body: bytes) -> ASGIApp:
    """A bare ASGI callable: read the request body, answer the same bytes with the headers
    the gateway sends (content-length, content-type, x-request-id)."""
    headers = [
        (b"content-length", b"%d" % len(body)),
        (b"content-type", b"application/json"),
        (b"x-request-id", b"bare"),
    ]
    start = {"type": "http.response.start", "status": 200, "headers": headers}
    answer = {"type": "http.response.body", "body": body}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan: nothing to start
            message = await receive()
            while message["type"] != "lifespan.shutdown":  # bounded: startup, then shutdown
                await send({"type": "lifespan.startup.complete"})
                message = await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        more = True
        while more:  # bounded by the request's body
            message = await receive()
            more = message.get("more_body", False)
        await send(start)
        await send(answer)

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body", type=Path, required=True)
    parser.add_argument("--bare", action="store_true", help="a bare ASGI callable, no FastAPI")
    args = parser.parse_args()
    body = args.body.read_bytes()
    application: ASGIApp = bare_app(body) if args.bare else create_app(body)
    gc.collect()
    gc.freeze()
    uvicorn.run(
        application,
        host="127.0.0.1",
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        # As `python -m app` runs without FORWARDED_ALLOW_IPS: no proxy-headers layer.
        proxy_headers=False,
        forwarded_allow_ips="",
    )
