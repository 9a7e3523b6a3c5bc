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
callable bounds what the gateway's hot path can reach in CPython. With `--from-store` it
reads each batch from the file instead (one query, on a connection set up as the
gateway's reads on the loop's thread): the store floor, beside the store-path workload.
"""

from __future__ import annotations

import argparse
import gc
import sqlite3
import sys
import time
from contextlib import closing
from operator import itemgetter
from pathlib import Path

import orjson
import uvicorn
from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings
from app.gateway.cache import CachedUser
from app.gateway.results import LookupResult
from app.store.sqlite import SELECT_RENDERED, connect_now
from tests.support.procs import Process, free_port


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


def floor_app(db: Path, *, from_store: bool = False) -> ASGIApp:
    """The lookup floor (see the module docstring), over the users stored in `db`; with
    `from_store`, each batch read from the file instead, by one query on a connection
    set up as the gateway's reads on the loop's thread are."""
    users: dict[int, CachedUser] = {}
    reader = connect_now(db)
    if not from_store:
        with closing(reader):
            users = dict(stored_users(reader, None))
    fetched = itemgetter(1)
    ttl_s = Settings.model_fields["cache_ttl_s"].default  # the bench gateway's
    other = bare_app(b"{}")  # the lifespan and the readiness probe

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await other(scope, receive, send)
            return
        message = await receive()  # one message: wrk's bodies are small
        user_ids = orjson.loads(message["body"])["user_ids"]
        held = dict(stored_users(reader, user_ids)) if from_store else users
        missing: list[int] = []
        try:
            found = itemgetter(*user_ids)(held)
        except KeyError:  # ids that do not exist (the simulator has none divisible by 97)
            found = tuple(held[uid] for uid in user_ids if uid in held)
            missing = [uid for uid in user_ids if uid not in held]
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


def stored_users(
    db: sqlite3.Connection, user_ids: list[int] | None
) -> list[tuple[int, CachedUser]]:
    """The users stored (those among `user_ids`; all of them for None), as memory holds them."""
    where = "json IS NOT NULL"  # every row the bench's gateway saved has it
    if user_ids is not None:
        where += f" AND user_id IN ({','.join('?' * len(user_ids))})"
    rows = db.execute(f"{SELECT_RENDERED} WHERE {where}", user_ids or ())
    return [(uid, (json[:-1], fetched)) for uid, fetched, json in rows]


def baseline_process(
    work: Path,
    body_file: Path | None = None,
    *,
    bare: bool = False,
    users: Path | None = None,
    from_store: bool = False,
) -> Process:
    """A bare FastAPI route (or, `bare`, a bare ASGI callable) answering `body_file`, or
    (`users`) the lookup floor over that SQLite file (`from_store`: reading each batch from
    it), served with the gateway's uvicorn flags."""
    port = free_port()
    args = [sys.executable, "-m", "bench.baseline", "--port", str(port)]
    if users is not None:
        args += ["--users", str(users), *(["--from-store"] if from_store else [])]
        name = "store-floor" if from_store else "floor"
    else:
        assert body_file is not None, "a fixed body to answer"
        args += ["--body", str(body_file), *(["--bare"] if bare else [])]
        name = "bare" if bare else "base"
    return Process(args, port, work / f"{name}.log", cwd=Path(__file__).resolve().parent.parent)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body", type=Path, help="the fixed body (without --users)")
    parser.add_argument("--bare", action="store_true", help="a bare ASGI callable, no FastAPI")
    parser.add_argument("--users", type=Path, help="the lookup floor over this SQLite file")
    parser.add_argument("--from-store", action="store_true", help="the floor reads each batch")
    args = parser.parse_args()
    application: ASGIApp
    if args.users is not None:
        application = floor_app(args.users, from_store=args.from_store)
    elif args.body is None:
        parser.error("--body or --users is needed")
    else:
        body = args.body.read_bytes()
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
