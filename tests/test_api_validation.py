"""Bad input gets a 4xx with a JSON message that says what is wrong, never a 500."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.apps import StartApp
from tests.support.freelancer import FakeFreelancer


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
        (b'{"user_ids": [1, 1.5]}', 422, "user_ids[1] must be a positive integer"),
        (b'{"user_ids": [2.0, -3.0]}', 422, "user_ids[1] must be a positive integer"),
        (b'{"user_ids": [9007199254740992.0]}', 422, "user_ids[0] must be a positive integer"),
        (b'{"user_ids": [1e300]}', 422, "up to 2^53 - 1, not 1e+300"),
        (b'{"user_ids": [true]}', 422, "user_ids[0] must be a positive integer"),
        (b'{"user_ids": ["12"]}', 422, "user_ids[0] must be a positive integer"),
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

    response = await running.client.post(
        "/api/users", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


async def test_integral_numbers_are_ids(start_app: StartApp, freelancer: FakeFreelancer) -> None:
    # JSON has one number type: 1079.0 is the integer 1079 (JSON Schema agrees).
    running = await start_app()
    response = await running.client.post(
        "/api/users",
        content=b'{"user_ids": [1079.0, 5, 1079, 5e0, 12.000]}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [u["user_id"] for u in body["users"]] == [1079, 5, 12]
    assert freelancer.lookups == {1079: 1, 5: 1, 12: 1}
    assert [type(i) for call in freelancer.calls for i in call] == [int, int, int]


@pytest.mark.parametrize(
    ("body", "unknown"),
    [
        ({"user_ids": [1], "foo": 1}, '"foo"'),
        ({"foo": 1, "user_ids": [1], "bar": None}, '"foo", "bar"'),
    ],
)
async def test_unknown_fields_are_refused_by_name(
    start_app: StartApp, freelancer: FakeFreelancer, body: dict[str, object], unknown: str
) -> None:
    running = await start_app()
    response = await running.client.post("/api/users", json=body)
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_request"
    assert f"unknown field{'s' if ',' in unknown else ''} {unknown}" in response.json()["detail"]
    assert freelancer.calls == []
    revalidate = await running.client.post("/api/cache/revalidate", json=body)
    assert revalidate.status_code == 422
    assert 'unknown field "foo"' in revalidate.json()["detail"]
    assert freelancer.calls == []


async def test_every_request_body_is_closed_in_the_schema(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    schema = (await running.client.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    bodies = 0
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if "requestBody" not in operation:
                continue
            bodies += 1
            body = operation["requestBody"]["content"]["application/json"]["schema"]
            if "$ref" in body:
                body = components[body["$ref"].rsplit("/", 1)[1]]
            assert body["additionalProperties"] is False, (method, path)
            for alternative in body.get("oneOf", []):
                assert alternative["additionalProperties"] is False, (method, path)
    assert bodies == 4  # POST /api/users, /api/jobs, /api/cache/revalidate, /api/users/revalidate


async def test_revalidation_takes_exactly_one_field(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    schema = (await running.client.get("/openapi.json")).json()
    body = schema["components"]["schemas"]["RevalidateRequest"]
    assert [(alt["required"], alt["additionalProperties"]) for alt in body["oneOf"]] == [
        (["user_ids"], False),
        (["older_than_s"], False),
    ]
    assert "required" not in body
    for wrong in (
        {},
        {"user_ids": [1], "older_than_s": 5},
        {"user_ids": None, "older_than_s": 5},
        {"user_ids": None},
    ):
        response = await running.client.post("/api/cache/revalidate", json=wrong)
        assert response.status_code == 422, wrong
        assert response.json() == {
            "error": "invalid_request",
            "detail": "give exactly one of user_ids or older_than_s",
        }
    assert freelancer.calls == []


async def test_revalidation_takes_integral_numbers_and_names_a_bad_id(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    response = await running.client.post("/api/cache/revalidate", json={"user_ids": [1079.0]})
    assert response.status_code == 202
    assert response.json() == {"queued": 1}
    assert await running.gateway.wait_idle(5)
    assert freelancer.lookups == {1079: 1}
    for bad, shown in ((1.5, "1.5"), (True, "true"), ("12", '"12"'), (0, "0"), (-4, "-4")):
        refused = await running.client.post("/api/cache/revalidate", json={"user_ids": [7, bad]})
        assert refused.status_code == 422
        assert refused.json()["detail"] == (
            f"user_ids[1]: must be a positive integer up to 2^53 - 1, not {shown}"
        )
    too_large = await running.client.post("/api/cache/revalidate", json={"user_ids": [2**53]})
    assert "user_ids[0]: must be a positive integer up to 2^53 - 1" in too_large.json()["detail"]


MALFORMED_IDS = ("abc", "-5", "0", "1.5", "1e3", "9007199254740992", "%C3%A9", "+5", "%205")


@pytest.mark.parametrize(
    ("method", "prefix"),
    [("GET", "/api/users/"), ("DELETE", "/api/users/"), ("DELETE", "/api/cache/users/")],
)
@pytest.mark.parametrize("segment", MALFORMED_IDS)
async def test_a_malformed_path_id_gets_one_422_naming_the_rule(
    start_app: StartApp, freelancer: FakeFreelancer, method: str, prefix: str, segment: str
) -> None:
    running = await start_app()
    response = await running.client.request(method, prefix + segment)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == "invalid_request"
    assert body["detail"].startswith("user_id: must be a positive integer up to 2^53 - 1, not ")
    assert freelancer.calls == []


async def test_the_largest_id_is_a_path_id(start_app: StartApp, freelancer: FakeFreelancer) -> None:
    running = await start_app()
    freelancer.missing = {9007199254740991}
    response = await running.client.get("/api/users/9007199254740991")
    assert response.status_code == 404
    assert response.json()["detail"] == "Freelancer has no user 9007199254740991"
    assert freelancer.lookups == {9007199254740991: 1}


async def test_methods_and_routes_around_the_user_path_stay_sane(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    put = await running.client.put("/api/users/5")
    assert put.status_code == 405
    assert put.headers["allow"] == "DELETE, GET"
    assert put.json()["error"] == "method_not_allowed"
    # The old revalidation path is a POST route of its own, not the GET's user id...
    revalidate = await running.client.post("/api/users/revalidate", json={"user_ids": [3]})
    assert revalidate.status_code == 202
    assert revalidate.json() == {"queued": 1}
    # ...and the only method that path takes: it is not read as a (malformed) user id.
    for method in ("GET", "DELETE", "OPTIONS"):
        other = await running.client.request(method, "/api/users/revalidate")
        assert other.status_code == 405, method
        assert other.headers["allow"] == "POST"
    assert (await running.client.get("/nope")).status_code == 404


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


HUGE = ("1431213258281559914438459392", "9223372036854775808", "-9223372036854775809")
NOT_FINITE = ("inf", "-inf", "nan", "1e400")


async def test_numbers_past_64_bits_or_not_finite_in_any_parameter_get_a_4xx(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """Every integer and number parameter the schema names, given a number past 64 bits or
    one that is not finite: a 4xx JSON answer (a store cannot hold such a number, a view
    cannot show it), never a 500 or a job that shows `null` where the schema says number."""
    running = await start_app(webhook_secret="fuzz-secret-0123456789")
    job = (await running.client.post("/api/jobs", json={"user_ids": [1, 2]})).json()
    schema = (await running.client.get("/openapi.json")).json()
    tried = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for parameter in operation.get("parameters", []):
                kinds = {parameter["schema"].get("type")} | {
                    branch.get("type") for branch in parameter["schema"].get("anyOf", [])
                }
                if not kinds & {"integer", "number"}:
                    continue
                values = HUGE + (NOT_FINITE if "number" in kinds else ())
                for value in values:
                    url, params = path, {}
                    if parameter["in"] == "path":
                        url = url.replace("{" + parameter["name"] + "}", value)
                    else:
                        params[parameter["name"]] = value
                    url = url.replace("{job_id}", job["job_id"]).replace("{user_id}", "1")
                    response = await running.client.request(
                        method,
                        url,
                        params=params,
                        content=b"1\n" if method == "post" else None,
                        headers={"content-type": "text/plain"} if method == "post" else {},
                    )
                    tried.append((method, path, parameter["name"], value))
                    where = f"{method.upper()} {url} {parameter['name']}={value}"
                    assert 400 <= response.status_code < 500, f"{where}: {response.text}"
                    assert response.json()["error"], where
    assert ("get", "/api/jobs/{job_id}/results", "cursor", HUGE[0]) in tried
    assert ("post", "/api/jobs", "max_age_s", "inf") in tried
    # The same numbers in a JSON body.
    for body in (
        b'{"user_ids": [1], "max_age_s": 1e400}',
        b'{"user_ids": [1], "max_age_s": Infinity}',
        b'{"user_ids": [1], "max_age_s": 1e300}',
        b'{"id_range": [1, 1431213258281559914438459392]}',
    ):
        response = await running.client.post(
            "/api/jobs", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, (body, response.text)
