"""Request ids, JSON log lines, audit lines, and no secret in any log or metric."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from asgi_lifespan import LifespanManager
from pydantic import SecretStr

from app.logs import JsonFormatter, SecretMask, TextFormatter, _RequestIdFilter, redact
from app.main import create_app
from app.store import SqliteUserStore
from tests.support.apps import StartApp, make_settings
from tests.support.freelancer import FakeFreelancer

ADMIN = "admin-key-0123456789abcdef"
TOKEN = "freelancer-token-0123456789"
MONGO_PASSWORD = "s3cret-mongo-pw"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Every log line of the test, formatted as the JSON handler formats it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    levels = {name: logging.getLogger(name).level for name in ("app", "app.access")}
    logging.getLogger("app").setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


async def test_a_sane_request_id_is_echoed_and_an_odd_one_replaced(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    given = await running.client.get("/api/stats", headers={"X-Request-ID": "job-42.a"})
    assert given.headers["X-Request-ID"] == "job-42.a"
    for odd in ("x" * 200, "has space", 'quote"d'):
        answer = await running.client.get("/api/stats", headers={"X-Request-ID": odd})
        assert answer.headers["X-Request-ID"] != odd
        assert 8 <= len(answer.headers["X-Request-ID"]) <= 40
    first = (await running.client.get("/healthz")).headers["X-Request-ID"]
    second = (await running.client.get("/healthz")).headers["X-Request-ID"]
    assert first != second
    errors = await running.client.post(
        "/api/users", content=b"nope", headers={"content-type": "application/json"}
    )
    assert errors.status_code == 400 and errors.headers["X-Request-ID"]


async def test_access_and_worker_lines_are_json_with_the_request_id(
    start_app: StartApp, freelancer: FakeFreelancer, json_log: io.StringIO
) -> None:
    running = await start_app(access_log=True)
    response = await running.client.post(
        "/api/users", json={"user_ids": [5, 6]}, headers={"X-Request-ID": "trace-1"}
    )
    assert response.status_code == 200
    assert await running.gateway.wait_idle(5)
    records = lines(json_log)
    access = [r for r in records if r["logger"] == "app.access"]
    assert access[-1]["request_id"] == "trace-1"
    assert access[-1]["method"] == "POST"
    assert access[-1]["route"] == "/api/users"
    assert access[-1]["status"] == 200
    assert isinstance(access[-1]["duration_ms"], float)
    assert str(access[-1]["key"]).startswith("ip:")
    batch = [r for r in records if "fetched batch of 2 ids" in str(r["msg"])]
    assert batch and batch[0]["request_id"] == "trace-1", "the worker names who it serves"
    for record in records:
        assert {"ts", "level", "logger", "msg", "request_id"} <= record.keys()


async def test_admin_calls_leave_an_audit_line_naming_the_key(
    start_app: StartApp, freelancer: FakeFreelancer, json_log: io.StringIO
) -> None:
    running = await start_app(api_keys=f"boss:{ADMIN}:admin")
    headers = {"X-API-Key": ADMIN}
    await running.client.post("/api/cache/revalidate", json={"user_ids": [1, 2]}, headers=headers)
    await running.client.delete("/api/cache/users/1", headers=headers)
    audits = [r for r in lines(json_log) if r["logger"] == "app.audit"]
    assert [(a["key"], a["action"], a["size"]) for a in audits] == [
        ("boss", "revalidate", 2),
        ("boss", "evict", 1),
    ]


async def test_no_key_token_or_password_reaches_a_log_line_or_a_metric(
    start_app: StartApp, freelancer: FakeFreelancer, json_log: io.StringIO, tmp_path: Path
) -> None:
    from tests.support.apps import FlakyStore

    running = await start_app(
        store=FlakyStore(tmp_path / "users.db"),
        api_keys=f"boss:{ADMIN}:admin",
        freelancer_oauth_token=TOKEN,
        mongodb_url=f"mongodb://gateway:{MONGO_PASSWORD}@db.invalid:27017/users",
        access_log=True,
    )
    headers = {"X-API-Key": ADMIN, "Authorization": f"Bearer {ADMIN}"}
    await running.client.post("/api/users", json={"user_ids": [1, 2]}, headers=headers)
    await running.client.post("/api/users", json={"user_ids": [1]}, headers={"X-API-Key": "bad"})
    logging.getLogger("app").error(
        "simulated driver error: cannot reach mongodb://gateway:%s@db.invalid", MONGO_PASSWORD
    )
    metrics = (await running.client.get("/metrics")).text
    stats = (await running.client.get("/api/stats", headers=headers)).text
    text = json_log.getvalue()
    assert "simulated driver error" in text
    for secret in (ADMIN, TOKEN, MONGO_PASSWORD):
        assert secret not in text
        assert secret not in metrics
        assert secret not in stats


async def test_secrets_are_masked_while_their_app_runs_and_forgotten_when_it_stops(
    tmp_path: Path, freelancer: FakeFreelancer, json_log: io.StringIO
) -> None:
    for token in ("first-token-0123456789", "second-token-0123456789"):
        settings = make_settings(tmp_path, freelancer_oauth_token=token)
        async with LifespanManager(create_app(settings, upstream_transport=freelancer.transport)):
            logging.getLogger("app").warning("a driver said: bad token %s", token)
        # No list of secrets outlives its app: the handlers carry no mask any more.
        assert not [
            f for f in logging.getLogger().handlers[-1].filters if isinstance(f, SecretMask)
        ]
    text = json_log.getvalue()
    assert text.count("a driver said: bad token ***") == 2
    assert "first-token" not in text and "second-token" not in text


def test_redact_masks_url_credentials() -> None:
    assert redact("mongodb://u:pw@h:1/db and http://a@b") == "mongodb://***@h:1/db and http://***@b"


def test_text_lines_carry_the_request_id() -> None:
    record = logging.LogRecord("app", logging.INFO, "x", 1, "hello", None, None)
    record.request_id = "abc"
    assert TextFormatter().format(record).endswith("app [abc]: hello")


@pytest.mark.e2e  # a subprocess
def test_the_server_logs_json_when_asked(tmp_path: Path) -> None:
    """`LOG_FORMAT=json python -m app check`: every line the process writes is JSON."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import logging; from app.logs import configure_logging;"
            "configure_logging('INFO', force=True, fmt='json');"
            "logging.getLogger('app').warning('hello %s', 'there')",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[1],
    )
    line = json.loads(result.stderr.strip())
    assert (line["level"], line["logger"], line["msg"]) == ("WARNING", "app", "hello there")


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("redis://:redis-secret-1@127.0.0.1:1/0", "redis-secret-1"),
        ("redis://default:p%40ss%3Aword-2@127.0.0.1:1/0", "p%40ss%3Aword-2"),
        ("redis://default:p%40ss%3Aword-2@127.0.0.1:1/0", "p@ss:word-2"),
        ("mongodb://gw:mongo-pw-33@h1:27017,h2:27017/db?replicaSet=rs0", "mongo-pw-33"),
        ("mongodb://gw:un@coded-44@db.invalid/users", "un@coded-44"),
    ],
)
async def test_urls_with_an_empty_user_or_an_encoded_password_are_masked(
    freelancer: FakeFreelancer, json_log: io.StringIO, tmp_path: Path, url: str, secret: str
) -> None:
    """However the password is written in the URL, and wherever a driver quotes it (the
    URL, the password alone, encoded or not), no log line shows it."""
    settings = make_settings(tmp_path, redis_url=None, mongodb_url=None)
    field = "redis_url" if url.startswith("redis") else "mongodb_url"
    settings = settings.model_copy(update={field: SecretStr(url)})
    async with LifespanManager(
        create_app(settings, store=SqliteUserStore(tmp_path / "u.db"),
                   upstream_transport=freelancer.transport)
    ):  # fmt: skip
        for shown in (url, secret, "p%40ss%3Aword-2", "p@ss:word-2"):
            logging.getLogger("app").error("a driver said: cannot connect with %s", shown)
    text = json_log.getvalue()
    assert text.count("a driver said") == 4
    assert secret not in text, text


def test_redact_masks_url_credentials_however_they_are_written() -> None:
    assert redact("redis://:pw@h:6379/0") == "redis://***@h:6379/0"
    assert redact("mongodb://u:p@ss@h/db") == "mongodb://***@h/db"
    assert redact("see https://example.com/a@b") == "see https://example.com/a@b"
