"""Open mode serves its own machine only: a web page the operator opens cannot drive it.

A page on another site can make the operator's browser send requests to a gateway on
loopback: simple requests (a `text/plain` POST, an image's GET) with its own `Origin`, or,
after rebinding its own name to 127.0.0.1, requests that carry its name as `Host`. Each
is refused with a 4xx JSON body naming what to change, and reaches nothing behind it.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.apps import Running, StartApp
from tests.support.freelancer import FakeFreelancer

EVIL = "https://evil.example"
KEY = "reader-key-0123456789abcdef"


async def stats(running: Running) -> dict[str, Any]:
    body: dict[str, Any] = (await running.client.get("/api/stats")).json()
    return body


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/users", b'{"user_ids": [1, 2]}'),
        ("POST", "/api/jobs", b"1\n2\n"),
        ("POST", "/api/cache/clear-expired", b""),
        ("POST", "/api/cache/revalidate", b'{"user_ids": [1]}'),
        ("DELETE", "/api/cache/users/1", b""),
        ("GET", "/api/users/1", b""),
    ],
)
async def test_a_page_from_another_origin_is_refused(
    start_app: StartApp, freelancer: FakeFreelancer, method: str, path: str, body: bytes
) -> None:
    running = await start_app()
    response = await running.client.request(
        method,
        path,
        content=body or None,
        headers={"Origin": EVIL, "Content-Type": "text/plain"},
    )
    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert EVIL in detail and "API_KEYS" in detail
    assert freelancer.calls == []
    assert (await running.client.get("/api/jobs")).json()["jobs"] == []
    # An image or a link from another site carries no Origin on a GET, but browsers say
    # where it came from in Sec-Fetch-Site.
    response = await running.client.request(
        method, path, content=body or None, headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert response.status_code == 403, response.text
    assert freelancer.calls == []


async def test_origin_null_and_a_same_site_page_are_foreign_too(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    for headers in (
        {"Origin": "null"},
        {"Origin": "http://localhost:3000"},  # another port of this machine: another origin
        {"Sec-Fetch-Site": "same-site"},
    ):
        response = await running.client.post("/api/users", json={"user_ids": [1]}, headers=headers)
        assert response.status_code == 403, (headers, response.text)
    assert freelancer.calls == []


@pytest.mark.parametrize(
    "host",
    [
        "rebind.evil.example",
        "rebind.evil.example:8000",
        "0.0.0.0:8000",
        "localhost.evil.example",
        "localhost:8000@evil.example",
        "[::1",
        "127.1",
        "2130706433",
    ],
)
async def test_a_rebound_name_is_refused_everywhere_but_the_probes(
    start_app: StartApp, freelancer: FakeFreelancer, host: str
) -> None:
    running = await start_app()
    headers = {"Host": host}
    for method, path in (
        ("GET", "/api/stats"),
        ("GET", "/api/users/5"),
        ("DELETE", "/api/cache/users/5"),
        ("GET", "/"),
        ("GET", "/metrics"),
        ("GET", "/dashboard"),
    ):
        response = await running.client.request(method, path, headers=headers)
        assert response.status_code == 403, (method, path, response.text)
        assert "ALLOWED_HOSTS" in response.json()["detail"], response.text
    posted = await running.client.post("/api/users", json={"user_ids": [1]}, headers=headers)
    assert posted.status_code == 403
    assert freelancer.calls == []
    # Probes say nothing and spend nothing: a load balancer may call them by any name.
    assert (await running.client.get("/healthz", headers=headers)).status_code == 200
    assert (await running.client.get("/readyz", headers=headers)).status_code == 200


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:8000", "LOCALHOST:8000", "127.0.0.1", "127.0.0.1:8000",
     "127.1.2.3:80", "[::1]", "[::1]:8000"],
)  # fmt: skip
async def test_this_machines_names_are_served_with_their_own_origin(
    start_app: StartApp, freelancer: FakeFreelancer, host: str
) -> None:
    running = await start_app()
    response = await running.client.post(
        "/api/users",
        json={"user_ids": [1]},
        headers={"Host": host, "Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"},
    )
    assert response.status_code == 200, response.text
    assert freelancer.lookups == {1: 1}


async def test_allowed_hosts_adds_names(start_app: StartApp, freelancer: FakeFreelancer) -> None:
    running = await start_app(allowed_hosts="gw.internal, 10.0.0.5")
    for host in ("gw.internal:8000", "GW.internal", "10.0.0.5:8000"):
        response = await running.client.get("/api/stats", headers={"Host": host})
        assert response.status_code == 200, (host, response.text)
    assert (await running.client.get("/api/stats", headers={"Host": "gw.evil"})).status_code == 403


async def test_a_link_to_the_pages_from_elsewhere_still_opens_them(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """Reading a page spends nothing, and the browser keeps its content from the other
    site: a link from a wiki to /docs or /dashboard opens."""
    running = await start_app()
    headers = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    for path in ("/docs", "/dashboard", "/"):
        assert (await running.client.get(path, headers=headers)).status_code == 200, path


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/api/users", "text/plain"),
        ("/api/users", None),
        ("/api/users", "application/x-www-form-urlencoded"),
        ("/api/users", "multipart/form-data; boundary=x"),
        ("/api/cache/revalidate", "text/plain"),
        ("/api/cache/revalidate", None),
        ("/api/users/revalidate", "text/plain"),
        ("/api/jobs", None),
        ("/api/jobs", "application/x-www-form-urlencoded"),
    ],
)
async def test_json_routes_take_only_json(
    start_app: StartApp, freelancer: FakeFreelancer, path: str, content_type: str | None
) -> None:
    """A page's form or `fetch` without a JSON content type is a "simple request" that no
    CORS preflight stops; a JSON route refuses it whatever its origin."""
    running = await start_app()
    headers = {"Content-Type": content_type} if content_type else {}
    response = await running.client.post(path, content=b'{"user_ids": [1]}', headers=headers)
    assert response.status_code == 415, response.text
    assert "application/json" in response.json()["detail"]
    assert freelancer.calls == []
    ok = await running.client.post(
        "/api/users",
        content=b'{"user_ids": [1]}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 200


async def test_with_keys_the_key_authenticates_whatever_the_host_or_origin(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(api_keys=f"reader:{KEY}")
    headers = {"Host": "gateway.example.com", "Origin": EVIL, "X-API-Key": KEY}
    response = await running.client.post("/api/users", json={"user_ids": [1]}, headers=headers)
    assert response.status_code == 200, response.text
    # The app grants no CORS: a browser would not let the other origin read this answer.
    assert not any(name.startswith("access-control-") for name in response.headers)
    missing = await running.client.post(
        "/api/users", json={"user_ids": [1]}, headers={"Host": "gateway.example.com"}
    )
    assert missing.status_code == 401


async def test_a_request_on_a_reachable_socket_is_refused_unless_auth_is_disabled(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """Protected mode: the socket a request came in on (`scope["server"]`) decides, not the
    HOST setting (the in-process client names the server after the URL it was given)."""
    running = await start_app(allowed_hosts="10.1.2.3")
    refused = await running.client.get("http://10.1.2.3:8000/api/stats")
    assert refused.status_code == 403
    detail = refused.json()["detail"]
    assert "10.1.2.3:8000" in detail and "API_KEYS" in detail and "AUTH_DISABLED" in detail
    posted = await running.client.post("http://10.1.2.3:8000/api/users", json={"user_ids": [1]})
    assert posted.status_code == 403
    assert freelancer.calls == []
    for url in ("http://127.0.0.1:8000/api/stats", "http://[::ffff:127.0.0.1]:8000/api/stats"):
        assert (await running.client.get(url)).status_code == 200, url
    meant = await start_app(allowed_hosts="10.1.2.3", auth_disabled=True)
    assert (await meant.client.get("http://10.1.2.3:8000/api/stats")).status_code == 200
