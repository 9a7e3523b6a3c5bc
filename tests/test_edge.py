"""The edge (`GatewayMiddleware` in `EdgeApp`) under the scopes and faults a server gives it.

A server run with a root path (`uvicorn app.main:app --root-path /gw`, behind a proxy that
serves the gateway under /gw) sends, as ASGI says, the full path in `scope["path"]` and the
prefix in `scope["root_path"]`: the router matches the path without the prefix, and so
must everything the middleware judges by path (keys, limits, the body limit, metrics).
"""

from __future__ import annotations

import httpx

from tests.support.apps import StartApp
from tests.support.freelancer import FakeFreelancer

KEY = "edge-key-0123456789abcdef"
KEYS = f"reader:{KEY}:read"
ROOT = "/gw"


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
