"""For scale: a bare FastAPI route, or a bare ASGI callable, answering a fixed body, or
the least a lookup in Python can do; served with the gateway's flags.

The body is the gateway's own answer to one hot batch (same size, same bytes), and uvicorn
runs as `python -m app serve` runs it, start-up objects frozen out of the GC included.
The bare callable (`--bare`) is the floor: uvicorn's own cost for a request and a 14 KB
answer, with no framework at all.

The lookup floor (`--users DB`) answers each batch as the gateway does, byte for byte,
with nothing else: the ids parsed unchecked, looked up in a dict of every user in the
gateway's SQLite file (its JSON and when it was fetched, as memory holds them), their
freshness checked, the answer joined. No key, limits, request id, metrics, validation or
fallback: no lookup served from Python objects can cost less, so its share of the bare
callable bounds what the gateway's hot path can reach in CPython.
"""

from __future__ import annotations

import argparse
import gc
import sqlite3
import time
from contextlib import closing
from operator import itemgetter
from pathlib import Path

import orjson
import uvicorn
from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings
from app.gateway.cache import CachedUser, from_store
from app.gateway.results import LookupResult


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


def floor_app(db: Path) -> ASGIApp:
    """The lookup floor (see the module docstring), over the users stored in `db`."""
    with closing(sqlite3.connect(db)) as connection:
        users: dict[int, CachedUser] = {
            uid: from_store((json, fetched))
            for uid, json, fetched in connection.execute(
                "SELECT user_id, json, fetched_at FROM users WHERE json IS NOT NULL"
            )
        }
    fetched = itemgetter(1)
    ttl_s = Settings.model_fields["cache_ttl_s"].default  # the bench gateway's

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await bare_app(b"{}")(scope, receive, send)  # lifespan, the readiness probe
            return
        message = await receive()  # one message: wrk's bodies are small
        user_ids = orjson.loads(message["body"])["user_ids"]
        missing: list[int] = []
        try:
            found = itemgetter(*user_ids)(users)
        except KeyError:  # ids that do not exist (the simulator has none divisible by 97)
            found = tuple(users[uid] for uid in user_ids if uid in users)
            missing = [uid for uid in user_ids if uid not in users]
        if min(map(fetched, found)) <= time.time() - ttl_s:
            raise RuntimeError("a stale user: the floor serves only fresh ones")
        answer = LookupResult(found, not_found=missing).to_json()
        headers = [
            (b"content-length", b"%d" % len(answer)),
            (b"content-type", b"application/json"),
            (b"x-request-id", b"floor"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body", type=Path, required=True)
    parser.add_argument("--bare", action="store_true", help="a bare ASGI callable, no FastAPI")
    parser.add_argument("--users", type=Path, help="the lookup floor over this SQLite file")
    args = parser.parse_args()
    body = args.body.read_bytes()
    application: ASGIApp
    if args.users is not None:
        application = floor_app(args.users)
    else:
        application = bare_app(body) if args.bare else create_app(body)
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
