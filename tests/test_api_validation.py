"""Bad input gets a 4xx with a JSON message that says what is wrong, never a 500."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import FakeFreelancer, StartApp


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b'{"user_ids": []}', 400, "at least 1"),
        (
            b'{"user_ids": [' + b",".join(b"%d" % i for i in range(1, 102)) + b"]}",
            400,
            "at most 100",
        ),
        (b"not json", 400, "not valid JSON"),
        (b"", 400, "not valid JSON"),
        (b'{"user_ids": [0]}', 422, "user_ids[0] must be a positive integer"),
        (b'{"user_ids": [-5]}', 422, "user_ids[0]"),
        (b'{"user_ids": [1, 2.0]}', 422, "user_ids[1]"),
        (b'{"user_ids": [true]}', 422, "user_ids[0]"),
        (b'{"user_ids": ["12"]}', 422, "user_ids[0]"),
        (b'{"user_ids": [null]}', 422, "user_ids[0]"),
        (b'{"user_ids": [[1]]}', 422, "user_ids[0]"),
        (b'{"user_ids": [9007199254740992]}', 422, "up to 2^53 - 1"),
        (b'{"user_ids": [9223372036854775808]}', 422, "up to 2^53 - 1"),
        (b'{"user_ids": [123456789012345678901234567890]}', 422, "up to 2^53 - 1"),
        (b'{"user_ids": "1,2"}', 422, "must be a list"),
        (b'{"user_ids": {"a": 1}}', 422, "must be a list"),
        (b'{"ids": [1]}', 422, "JSON object like"),
        (b"[1, 2, 3]", 422, "JSON object like"),
        (b'{"user_ids": ["\\u00e9\\u0000"]}', 422, "user_ids[0]"),
        ('{"user_ids": [1, "\u00e9\u0000"]}'.encode(), 400, "not valid JSON"),
        (b"[" * 5000 + b"]" * 5000, 400, "not valid JSON"),
    ],
)
async def test_bad_lookup_bodies_get_a_4xx_that_says_what_is_wrong(
    start_app: StartApp, freelancer: FakeFreelancer, body: bytes, status: int, says: str
) -> None:
    running = await start_app()
    response = await running.client.post(
        "/api/users", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert says in response.json()["detail"]
    assert freelancer.calls == []
    # ...and the service keeps serving.
    assert (await running.lookup(1))["users"][0]["user_id"] == 1


async def test_a_body_over_the_limit_gets_413_before_parsing(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(max_body_bytes=1024)
    response = await running.client.post(
        "/api/users", content=b'{"user_ids": [' + b"1," * 1000 + b"1]}"
    )
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"


async def test_a_streamed_body_over_the_limit_gets_413(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(max_body_bytes=1024)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 500

    response = await running.client.post("/api/users", content=chunks())
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/users/0", 422),
        ("/api/users/9007199254740992", 422),
        ("/api/users/abc", 404),
        ("/api/users/-1", 404),
        ("/nope", 404),
    ],
)
async def test_bad_paths_get_json_errors(
    start_app: StartApp, freelancer: FakeFreelancer, path: str, status: int
) -> None:
    running = await start_app()
    response = await running.client.get(path)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["detail"]


async def test_a_configured_maximum_is_enforced_and_documented(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(max_users_per_request=5)
    response = await running.client.post("/api/users", json={"user_ids": [1, 2, 3, 4, 5, 6]})
    assert response.status_code == 400
    assert "at most 5" in response.json()["detail"]
    schema = (await running.client.get("/openapi.json")).json()
    body = schema["paths"]["/api/users"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["properties"]["user_ids"]["maxItems"] == 5
