"""For scale: a bare FastAPI route answering a fixed body, served with the gateway's flags.

The body is the gateway's own answer to one hot batch (same size, same bytes), and uvicorn
runs as `python -m app serve` runs it, start-up objects frozen out of the GC included.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request, Response


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


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body", type=Path, required=True)
    args = parser.parse_args()
    application = create_app(args.body.read_bytes())
    gc.collect()
    gc.freeze()
    uvicorn.run(
        application,
        host="127.0.0.1",
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
