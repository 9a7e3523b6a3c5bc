"""What each of the app's ASGI middlewares costs per request, measured in-process.

Each middleware wraps a trivial ASGI endpoint that answers a fixed body; its cost is the
time per request minus the bare endpoint's, the best of a few rounds of CALLS requests.
No sockets and no server: the figure is the middleware's own work, in microseconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.http.auth import KeyRing, load_keys
from app.http.client_limits import ClientLimits
from app.http.metrics import RequestMetrics
from app.http.middleware import GatewayMiddleware

CALLS = 20_000
ROUNDS = 5
BODY = b'{"user_ids": [' + b",".join(str(i).encode() for i in range(1, 51)) + b"]}"
KEY = "bench-key-0123456789abcdef"
SCOPE: Scope = {
    "type": "http",
    "method": "POST",
    "path": "/api/users",
    "client": ("127.0.0.1", 50000),
    "headers": [
        (b"host", b"127.0.0.1:8000"),
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(BODY)),
        (b"x-api-key", KEY.encode()),
    ],
}


async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """Read the body, answer a fixed one."""
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _receive() -> Message:
    return {"type": "http.request", "body": BODY, "more_body": False}


async def _send(message: Message) -> None:
    return None


async def per_request_us(app: ASGIApp) -> float:
    """Microseconds per request through `app`, best of ROUNDS."""
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(CALLS):
            await app(dict(SCOPE), _receive, _send)
        best = min(best, (time.perf_counter() - started) / CALLS)
    return best * 1e6


def stacks() -> dict[str, Callable[[ASGIApp], ASGIApp]]:
    """Each middleware as the app installs it, by name."""
    # Limits no run reaches: what is measured is the cost of counting, not of refusing.
    settings = Settings(_env_file=None, rate_limit_per_min=10**9, rate_limit_ids_per_min=10**9)
    keyed = settings.model_copy(update={"api_keys": SecretStr(f"bench:{KEY}:read")})
    ring = KeyRing(load_keys(keyed))
    return {
        "open (request id, body limit, metrics)": lambda app: GatewayMiddleware(
            app,
            max_bytes=64 * 1024,
            metrics=RequestMetrics(),
            keys=KeyRing([]),
            limits=ClientLimits(settings),
        ),
        "with an API key and client limits": lambda app: GatewayMiddleware(
            app,
            max_bytes=64 * 1024,
            metrics=RequestMetrics(),
            keys=ring,
            limits=ClientLimits(keyed, key_names=ring.names),
        ),
    }


async def measure() -> dict[str, Any]:
    """The bare endpoint's time, and each middleware's added cost, in microseconds."""
    bare = await per_request_us(endpoint)
    costs = {name: await per_request_us(wrap(endpoint)) - bare for name, wrap in stacks().items()}
    return {"bare_us": bare, "added_us": costs}


def main() -> None:
    result = asyncio.run(measure())
    print(f"bare ASGI endpoint: {result['bare_us']:.2f} us/request")
    for name, cost in result["added_us"].items():
        print(f"  + {name}: {cost:.2f} us/request")


if __name__ == "__main__":
    main()
