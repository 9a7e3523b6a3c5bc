"""The factory, the settings, and the modes the app starts in."""

from __future__ import annotations

import asyncio
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app.config import Settings
from app.gateway import Gateway
from app.http.state import services_of
from app.jobs.runner import JobRunner
from app.main import create_app
from tests.support.apps import StartApp, make_settings
from tests.support.freelancer import FakeFreelancer

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_app_module_builds_nothing() -> None:
    module = importlib.import_module("app.main")
    assert "app" not in vars(module), "`app` is built only when uvicorn asks for it"


def test_create_app_opens_nothing_until_the_lifespan_runs(tmp_path: Path) -> None:
    app = create_app(Settings(_env_file=None, sqlite_path=tmp_path / "x" / "users.db"))
    assert services_of(app).gateway is None
    assert not (tmp_path / "x").exists()


async def test_a_part_that_fails_to_start_stops_every_part_started_before_it(
    tmp_path: Path, freelancer: FakeFreelancer, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[Gateway] = []
    gateway_start = Gateway.start

    async def recorded_start(self: Gateway) -> None:
        started.append(self)
        await gateway_start(self)

    async def broken_start(self: JobRunner) -> None:
        raise RuntimeError("the job runner could not start")

    monkeypatch.setattr(Gateway, "start", recorded_start)
    monkeypatch.setattr(JobRunner, "start", broken_start)
    app = create_app(make_settings(tmp_path), upstream_transport=freelancer.transport)
    try:
        with pytest.raises(RuntimeError, match="could not start"):
            async with LifespanManager(app):
                pass
        # The gateway had started (store open, worker running) before the runner failed.
        assert len(started) == 1
        running = [t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert "worker-supervisor" not in running, "the gateway was left running"
        assert services_of(app).gateway is None
    except AssertionError:
        for gateway in started:  # end the test cleanly: a leftover worker would hang it
            await gateway.stop()
        raise


def test_env_template_documents_every_setting_with_its_default(tmp_path: Path) -> None:
    shutil.copy(ROOT / ".env.template", tmp_path / ".env")
    from_template = Settings(_env_file=tmp_path / ".env")
    defaults = Settings(_env_file=None)
    assert from_template == defaults
    text = (ROOT / ".env.template").read_text()
    for name in Settings.model_fields:
        assert f"{name.upper()}=" in text, f"{name.upper()} is not in .env.template"


async def test_without_credentials_it_runs_in_demo_mode_on_the_simulator(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, sqlite_path=tmp_path / "users.db", simulator_latency_ms=0)
    assert settings.upstream_kind == "simulator"
    app = create_app(settings)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            health = (await client.get("/")).json()
            assert health["upstream"] == "simulator"
            assert health["store"] == "sqlite"
            body = (await client.post("/api/users", json={"user_ids": [1, 2, 97]})).json()
    assert [u["user_id"] for u in body["users"]] == [1, 2]
    assert body["not_found"] == [97]


async def test_health_queue_stats_and_metrics_answer(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    await running.lookup(1, 2)
    await running.lookup(1, 2)
    health = (await running.client.get("/")).json()
    assert health == {
        "message": "Freelancer user-info gateway is running",
        "status": "healthy",
        "problems": [],
        "queue_size": 0,
        "processing_count": 0,
        "store": "sqlite",
        "upstream": "freelancer",
        "upstream_state": "ok",
        "auth": "open",
        "coordination": "local",
        "processes": 1,
        "refresh_ahead": {"enabled": True, "popular": 0, "covered": 0, "coverage": 1.0},
        "budget": [  # the one call, in both windows
            {
                "name": "minute",
                "limit": 60_000,
                "period_s": 60,
                "margin_s": 1.0,
                "used": 1,
                "remaining": 59_999,
                "next_call_in_s": 0.0,
            },
            {
                "name": "hour",
                "limit": 3_600_000,
                "period_s": 3600,
                "margin_s": 1.0,
                "used": 1,
                "remaining": 3_599_999,
                "next_call_in_s": 0.0,
            },
        ],
        "budget_waiting": [],
    }
    queue = (await running.client.get("/api/queue")).json()
    assert queue == {
        "queue_size": 0,
        "processing_count": 0,
        "currently_processing": [],
        "queue_limit": 1000,
    }
    assert await running.gateway.wait_idle(5)
    stats = (await running.client.get("/api/stats")).json()
    assert stats["total_users_cached"] == 2
    assert (stats["requests"], stats["cache_hits"], stats["fetched"]) == (2, 2, 2)
    assert (stats["upstream_calls"], stats["upstream_users_fetched"]) == (1, 2)
    metrics = (await running.client.get("/metrics")).text
    assert "gateway_upstream_calls_total 1.0" in metrics
    assert "gateway_cache_hits_total 2.0" in metrics
    assert 'route="/api/users"' in metrics
    assert 'gateway_budget_limit{window="hour"} 3.6e+06' in metrics
    assert 'gateway_jobs{status="running"} 0.0' in metrics
    assert "test-token" not in metrics
    assert (await running.client.get("/readyz")).json() == {"status": "ready"}


async def test_docs_describe_every_endpoint(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app()
    schema = (await running.client.get("/openapi.json")).json()
    paths = schema["paths"]
    for path in ("/api/users", "/api/users/{user_id}", "/api/users/revalidate", "/", "/api/stats"):
        assert path in paths
    post = paths["/api/users"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["properties"]["user_ids"]
    ok = post["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/UsersResponse")
    assert (await running.client.get("/docs")).status_code == 200
    assert (await running.client.get("/redoc")).status_code == 200


@pytest.mark.e2e  # a subprocess
def test_check_says_when_credentials_are_not_configured(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "check"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "FAIL not configured" in result.stdout
    assert "FREELANCER_OAUTH_TOKEN" in result.stdout


@pytest.mark.e2e  # a subprocess
def test_check_reports_a_network_failure(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "check"],
        cwd=tmp_path,
        env={
            "PATH": "/usr/bin:/bin",
            "FREELANCER_OAUTH_TOKEN": "secret-token-value",
            "FREELANCER_API_BASE": "http://127.0.0.1:1/api/users/0.1/users",
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "FAIL network" in result.stdout
    assert "secret-token-value" not in result.stdout + result.stderr
