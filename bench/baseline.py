"""For scale: a FastAPI handler that returns a fixed 50-user body, served like the gateway."""

from __future__ import annotations

import argparse

import orjson
import uvicorn
from fastapi import FastAPI, Request, Response

USER = {
    "user_id": 1,
    "username": "user1",
    "display_name": "User One",
    "country": "Australia",
    "city": "Sydney",
    "role": "freelancer",
    "registration_date": "2017-07-14T02:40:07Z",
    "avatar_url": "https://cdn.example/1.jpg",
    "created_at": "2026-11-24T14:00:00Z",
    "fetched_at": "2026-11-24T14:00:00Z",
    "source": "cache",
    "stale": False,
}
BODY = orjson.dumps(
    {"users": [USER] * 50, "total_count": 50, "not_found": [], "unavailable": [], "errors": {}}
)


def create_app() -> FastAPI:
    """The trivial app: read the body, answer the same bytes every time."""
    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/users")
    async def users(request: Request) -> Response:
        await request.body()
        return Response(BODY, media_type="application/json")

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        create_app(), host="127.0.0.1", port=args.port, log_level="warning", access_log=False
    )
