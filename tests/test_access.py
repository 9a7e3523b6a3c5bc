"""API keys and roles, per-client limits on a fake clock, the miss quota, protected mode."""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.errors import ConfigError
from app.http.auth import KeyRing, load_keys, parse_keys
from app.http.local_only import check_protected_mode
from tests.support.apps import Running, StartApp, make_settings
from tests.support.clock import FakeClock
from tests.support.freelancer import FakeFreelancer

READ = "read-key-0123456789abcdef"
CRAWL = "crawl-key-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"
KEYS = f"reader:{READ}, crawler:{CRAWL}:crawl, boss:{ADMIN}:admin"


def key(secret: str) -> dict[str, str]:
    return {"X-API-Key": secret}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def limits_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    """The client limits' windows (and Retry-After) on a test clock."""
    import app.http.client_limits

    clock = FakeClock()
    fake_time = types.SimpleNamespace(time=clock, monotonic=clock)
    monkeypatch.setattr(app.http.client_limits, "time", fake_time)
    yield clock


async def lookup(running: Running, ids: list[int], headers: dict[str, str]) -> httpx.Response:
    return await running.client.post("/api/users", json={"user_ids": ids}, headers=headers)


async def test_a_request_without_a_key_gets_401_and_an_unknown_key_403(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(api_keys=KEYS)
    missing = await lookup(running, [1], {})
    assert missing.status_code == 401
    assert missing.json()["error"] == "unauthorized"
    assert "X-API-Key" in missing.headers["WWW-Authenticate"]
    wrong = await lookup(running, [1], key("not-a-key-0123456789abcdef"))
    assert wrong.status_code == 403
    assert wrong.json() == {"error": "forbidden", "detail": "unknown API key"}
    assert freelancer.calls == []


async def test_a_key_works_in_either_header(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(api_keys=KEYS)
    assert (await lookup(running, [1], key(READ))).status_code == 200
    assert (await lookup(running, [1], bearer(READ))).status_code == 200
    assert (await running.client.get("/api/stats", headers=bearer(CRAWL))).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "role"),
    [
        ("POST", "/api/users", {"user_ids": [1]}, "read"),
        ("GET", "/api/users/1", None, "read"),
        ("GET", "/api/stats", None, "read"),
        ("GET", "/api/queue", None, "read"),
        ("POST", "/api/cache/revalidate", {"user_ids": [1]}, "crawl"),
        ("POST", "/api/cache/clear-expired", None, "admin"),
        ("DELETE", "/api/cache/users/1", None, "admin"),
    ],
)
async def test_each_role_reaches_what_it_may_and_no_more(
    start_app: StartApp,
    freelancer: FakeFreelancer,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    role: str,
) -> None:
    running = await start_app(api_keys=KEYS)
    rank = ["read", "crawl", "admin"].index(role)
    for index, secret in enumerate((READ, CRAWL, ADMIN)):
        response = await running.client.request(method, path, json=body, headers=key(secret))
        if index >= rank:
            assert response.status_code < 400, (secret, response.text)
        else:
            assert response.status_code == 403, (secret, response.text)
            assert f"needs the '{role}' role" in response.json()["detail"]
    assert (await running.client.request(method, path, json=body)).status_code == 401


async def test_health_and_probes_stay_public_and_metrics_too_unless_asked(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(api_keys=KEYS)
    for path in ("/", "/healthz", "/readyz", "/metrics"):
        assert (await running.client.get(path)).status_code == 200, path
    assert (await running.client.get("/")).json()["auth"] == "keys"
    locked = await start_app(api_keys=KEYS, metrics_require_key=True)
    assert (await locked.client.get("/metrics")).status_code == 401
    assert (await locked.client.get("/metrics", headers=key(READ))).status_code == 200


async def test_requests_past_the_limit_get_429_with_ratelimit_headers(
    start_app: StartApp, freelancer: FakeFreelancer, limits_clock: FakeClock
) -> None:
    running = await start_app(api_keys=KEYS, rate_limit_per_min=3)
    for _ in range(3):
        assert (await lookup(running, [1], key(READ))).status_code == 200
    refused = await lookup(running, [1], key(READ))
    assert refused.status_code == 429
    assert refused.json()["error"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 120
    assert refused.headers["RateLimit-Policy"].startswith('"requests";q=3;w=60')
    assert refused.headers["RateLimit"].startswith('"requests";r=0;t=')
    # Another client is not affected; the first is let in again as its window slides.
    assert (await lookup(running, [1], key(CRAWL))).status_code == 200
    limits_clock.advance(120)
    assert (await lookup(running, [1], key(READ))).status_code == 200


async def test_no_span_of_a_minute_holds_more_than_the_limit(
    start_app: StartApp, freelancer: FakeFreelancer, limits_clock: FakeClock
) -> None:
    """The limit is exact wherever the requests fall: 10 just before a minute's boundary
    (on the wall clock) and 11 just after let 10 in, not 11 (an estimated window weighted
    the first 10 as 9.99, rounded down, and let the 21st in: seen in CI). Retry-After
    is when the oldest requests leave the window, and then as many fit again."""
    limits_clock.now = 1_800_000_000.0 - 0.25  # a quarter of a second before a minute starts
    running = await start_app(api_keys=KEYS, rate_limit_per_min=20)
    statuses = [(await lookup(running, [1], key(READ))).status_code for _ in range(10)]
    limits_clock.advance(0.5)
    statuses += [(await lookup(running, [1], key(READ))).status_code for _ in range(11)]
    assert statuses == [200] * 20 + [429]
    refused = await lookup(running, [1], key(READ))
    assert refused.headers["Retry-After"] == "60", "the first ten leave in 59.5 s"
    limits_clock.advance(59.5 - 0.001)
    assert (await lookup(running, [1], key(READ))).status_code == 429, "not yet"
    limits_clock.advance(0.001)
    statuses = [(await lookup(running, [1], key(READ))).status_code for _ in range(11)]
    assert statuses == [200] * 10 + [429], "ten left, ten came"


async def test_ids_count_against_their_own_limit(
    start_app: StartApp, freelancer: FakeFreelancer, limits_clock: FakeClock
) -> None:
    running = await start_app(api_keys=KEYS, rate_limit_ids_per_min=150)
    assert (await lookup(running, list(range(1, 101)), key(READ))).status_code == 200
    refused = await lookup(running, list(range(1, 101)), key(READ))
    assert refused.status_code == 429
    assert refused.headers["RateLimit"].startswith('"ids";r=50;')
    assert (await lookup(running, list(range(1, 51)), key(READ))).status_code == 200
    limits_clock.advance(120)
    assert (await lookup(running, list(range(1, 101)), key(READ))).status_code == 200


async def test_a_batch_larger_than_the_ids_a_minute_is_refused_as_such_not_told_to_wait(
    start_app: StartApp, freelancer: FakeFreelancer, limits_clock: FakeClock
) -> None:
    """60 ids against 50 ids a minute never fit: a 429 saying "retry in 60 s" was a lie
    (the same 429 came after any wait). The answer says what is wrong, and spends nothing."""
    running = await start_app(api_keys=KEYS, rate_limit_ids_per_min=50)
    refused = await lookup(running, list(range(1, 61)), key(READ))
    assert refused.status_code == 400, refused.text
    assert "at most 50 ids" in refused.json()["detail"], refused.text
    assert "retry-after" not in refused.headers
    assert (await lookup(running, list(range(1, 51)), key(READ))).status_code == 200


async def test_a_greedy_client_gets_quota_for_new_ids_and_others_are_unaffected(
    start_app: StartApp, freelancer: FakeFreelancer, limits_clock: FakeClock
) -> None:
    running = await start_app(api_keys=KEYS, key_misses_per_min=5)
    first = (await lookup(running, [1, 2, 3], key(READ))).json()
    assert [u["user_id"] for u in first["users"]] == [1, 2, 3]
    greedy = (await lookup(running, [1, 2, 3, 10, 11, 12, 13, 14], key(READ))).json()
    assert [u["user_id"] for u in greedy["users"]] == [1, 2, 3, 10, 11], "cached users still come"
    assert greedy["unavailable"] == [12, 13, 14]
    assert greedy["errors"] == {"12": "quota", "13": "quota", "14": "quota"}
    other = (await lookup(running, [12, 13, 14], key(CRAWL))).json()
    assert [u["user_id"] for u in other["users"]] == [12, 13, 14]
    assert freelancer.lookups == dict.fromkeys([1, 2, 3, 10, 11, 12, 13, 14], 1)
    stats = (await running.client.get("/api/stats", headers=key(ADMIN))).json()
    usage = {row["name"]: row for row in stats["keys"]}
    assert usage["reader"]["misses"] == 5
    assert usage["reader"]["over_quota"] == 3
    assert usage["crawler"]["misses"] == 3
    limits_clock.advance(120)
    later = (await lookup(running, [20], key(READ))).json()
    assert later["errors"] == {}


async def test_metrics_show_usage_by_key_name_and_never_a_key(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(api_keys=KEYS)
    await lookup(running, [1, 2], key(READ))
    text = (await running.client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {s.labels["key"]: s.value for s in families["gateway_key_requests"].samples}
    assert requests["reader"] == 1
    ids = {s.labels["key"]: s.value for s in families["gateway_key_ids"].samples}
    assert ids["reader"] == 2
    for secret in (READ, CRAWL, ADMIN):
        assert secret not in text


def test_key_entries_are_parsed_with_roles_and_checked() -> None:
    keys = parse_keys(f"{KEYS}\nnightly:{'n' * 20}:crawl", source="API_KEYS")
    assert [(k.name, k.role) for k in keys] == [
        ("reader", "read"),
        ("crawler", "crawl"),
        ("boss", "admin"),
        ("nightly", "crawl"),
    ]
    for bad, why in [
        ("nameonly", "name:key"),
        (f"a:{READ}:root", "role 'root'"),
        (f"a:{READ},a:{CRAWL}", "used twice"),
        ("a:short", "shorter than 16"),
    ]:
        with pytest.raises(ConfigError, match=why):
            parse_keys(bad, source="API_KEYS")


def test_keys_come_from_a_file_too(tmp_path: Any) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# operators\nboss:{ADMIN}:admin\n\n")
    settings = make_settings(tmp_path, api_keys=f"reader:{READ}", api_keys_file=path)
    assert sorted(k.name for k in load_keys(settings)) == ["boss", "reader"]
    with pytest.raises(ConfigError, match="API_KEYS_FILE"):
        load_keys(make_settings(tmp_path, api_keys_file=tmp_path / "missing"))


def test_open_on_a_reachable_address_is_refused_unless_meant(tmp_path: Any) -> None:
    with pytest.raises(ConfigError) as refused:
        check_protected_mode(make_settings(tmp_path, host="0.0.0.0"), open_=True)
    assert "API_KEYS" in str(refused.value) and "AUTH_DISABLED" in str(refused.value)
    check_protected_mode(make_settings(tmp_path, host="0.0.0.0", auth_disabled=True), open_=True)
    check_protected_mode(make_settings(tmp_path, host="127.0.0.1"), open_=True)
    check_protected_mode(make_settings(tmp_path, host="::1"), open_=True)
    check_protected_mode(make_settings(tmp_path, host="0.0.0.0"), open_=False)


async def test_without_keys_the_service_is_open_and_says_so(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    assert (await running.client.get("/")).json()["auth"] == "open"
    assert (await running.client.delete("/api/cache/users/1")).status_code == 200


async def test_the_schema_offers_both_key_headers_when_keys_are_on(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(api_keys=KEYS)
    schema = (await running.client.get("/openapi.json")).json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["Bearer"]["scheme"] == "bearer"
    lookup_op = schema["paths"]["/api/users"]["post"]
    assert lookup_op["security"] == [{"ApiKey": []}, {"Bearer": []}]
    assert {"401", "403", "429"} <= lookup_op["responses"].keys()
    assert "security" not in schema["paths"]["/healthz"]["get"]
    open_app = await start_app()
    open_schema = (await open_app.client.get("/openapi.json")).json()
    assert "securitySchemes" not in open_schema.get("components", {})
    assert "429" in open_schema["paths"]["/api/users"]["post"]["responses"]


async def test_a_client_far_from_its_limit_is_never_let_past_it(
    start_app: StartApp, freelancer: FakeFreelancer, limits_clock: FakeClock
) -> None:
    """Credit taken from the limiter in advance never admits more than the limit."""
    running = await start_app(api_keys=KEYS, rate_limit_per_min=100)
    statuses = [(await lookup(running, [1], key(READ))).status_code for _ in range(105)]
    assert statuses.count(200) == 100
    assert statuses[100:] == [429] * 5


async def test_single_user_reads_count_against_the_same_quota(
    start_app: StartApp, freelancer: FakeFreelancer, limits_clock: FakeClock
) -> None:
    running = await start_app(api_keys=KEYS, key_misses_per_min=1)
    assert (await running.client.get("/api/users/30", headers=key(READ))).status_code == 200
    over = await running.client.get("/api/users/31", headers=key(READ))
    assert over.status_code == 429
    assert over.json()["reason"] == "quota"
    assert "KEY_MISSES_PER_MIN" in over.json()["detail"]
    assert freelancer.lookups == {30: 1}


async def from_address(running: Running, address: str, path: str = "/api/stats") -> int:
    """One request from `address`, as the server would report its peer."""
    transport = httpx.ASGITransport(app=running.app, client=(address, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        return (await client.get(path)).status_code


async def test_a_client_cannot_pick_its_name_with_forwarded_headers(
    start_app: StartApp, freelancer: FakeFreelancer, limits_clock: FakeClock
) -> None:
    """Open mode names a client by its address. Without FORWARDED_ALLOW_IPS, requests
    that say they were forwarded are one client, whatever they say (the server, if it
    believed the header, would have made each a client of its own)."""
    running = await start_app(rate_limit_per_min=20)
    statuses = []
    for n in range(30):
        for header in ("X-Forwarded-For", "Forwarded"):
            value = f"10.0.0.{n}" if header == "X-Forwarded-For" else f"for=10.0.1.{n}"
            transport = httpx.ASGITransport(app=running.app, client=(f"10.9.0.{n}", 40000))
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
                response = await c.get("/api/queue", headers={header: value})
            statuses.append(response.status_code)
    assert statuses.count(200) == 20 and statuses.count(429) == 40
    names = {row["name"] for row in (await running.client.get("/api/stats")).json()["keys"]}
    assert "ip:forwarded" in names and not any("10.0." in name for name in names)


async def test_clients_named_by_address_are_bounded_and_idle_ones_leave(
    start_app: StartApp, freelancer: FakeFreelancer, limits_clock: FakeClock
) -> None:
    running = await start_app()
    for n in range(300):
        assert await from_address(running, f"10.1.{n // 250}.{n % 250}") == 200
    rows = (await running.client.get("/api/stats")).json()["keys"]
    assert len(rows) <= 256 + 2, "at most 256 address clients, the caller, and ip:*"
    assert sum(row["requests"] for row in rows) == 301, "nothing counted is lost"
    limits = running.app.state.services.limits
    assert len(limits._logs) <= 3 * 258, "a log per limit per client kept, no more"
    text = (await running.client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    labels = {s.labels["key"]: s.value for s in families["gateway_key_requests"].samples}
    assert labels == {"ip:*": 301}, "one label for every address: no caller adds series"
    # Idle for two windows, they leave; their counts stay in ip:*.
    limits_clock.advance(121)
    assert await from_address(running, "10.2.0.1") == 200
    rows = (await running.client.get("/api/stats")).json()["keys"]
    by_name = {row["name"]: row["requests"] for row in rows}
    assert set(by_name) == {"ip:10.2.0.1", "ip:127.0.0.1", "ip:*"}
    assert sum(by_name.values()) == 303


async def test_metrics_label_key_names_only(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(api_keys=KEYS)
    await lookup(running, [1], key(READ))
    await lookup(running, [1], key("not-a-key-0123456789abcdef"))
    text = (await running.client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    labels = {s.labels["key"] for s in families["gateway_key_requests"].samples}
    assert labels == {"reader"}


async def test_request_metrics_take_no_label_from_the_caller(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """The method is the client's to choose: any method beyond HTTP's is counted as
    `other`, and a path no route matches as `unmatched`."""
    running = await start_app()
    for n in range(20):
        await running.client.request(f"X{n}", "/api/users")
        await running.client.get(f"/nope/{n}")
    text = (await running.client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = families["gateway_http_request_duration_seconds"].samples
    methods = {s.labels["method"] for s in samples}
    routes = {s.labels["route"] for s in samples}
    assert methods <= {"GET", "POST", "other"}, methods
    assert not any(route.startswith("/nope") for route in routes)


def test_a_hash_inside_a_key_is_part_of_it(tmp_path: Any) -> None:
    """Only a `#` that starts a line of API_KEYS_FILE starts a comment: a key may hold one."""
    secret = "abc#def-0123456789xyz"
    keys = parse_keys(f"ops:{secret}:admin", source="API_KEYS")
    assert [(k.name, k.role) for k in keys] == [("ops", "admin")]
    ring = KeyRing(keys)
    assert ring.identify([(b"x-api-key", secret.encode())], "127.0.0.1").role == "admin"
    path = tmp_path / "keys"
    path.write_text(f"# operators\n  # the night shift\nops:{secret}:admin\n")
    settings = make_settings(tmp_path, api_keys_file=path)
    assert [(k.name, k.role) for k in load_keys(settings)] == [("ops", "admin")]
    # A comment after an entry is not one: it is refused, not silently cut off.
    with pytest.raises(ConfigError, match="role"):
        parse_keys(f"ops:{secret}:admin  # ops team", source="API_KEYS")


def test_a_hash_in_a_key_survives_the_env_file(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What .env.template tells operators: quote a key that holds ` #` (a space, then #),
    which python-dotenv would read as the start of a comment; a bare `#` needs nothing."""
    env = tmp_path / "keys.env"
    env.write_text(
        "API_KEYS=ops:abc#def-0123456789xyz:admin\nGATEWAY_API_KEY='abc #def-0123456789xyz'\n"
    )
    monkeypatch.setitem(Settings.model_config, "env_file", str(env))
    settings = Settings()
    assert settings.api_keys is not None and settings.gateway_api_key is not None
    assert settings.api_keys.get_secret_value() == "ops:abc#def-0123456789xyz:admin"
    assert settings.gateway_api_key.get_secret_value() == "abc #def-0123456789xyz"
