"""Schemathesis against the app's own OpenAPI schema: no 5xx, every answer as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from app.config import Settings
from app.main import create_app


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> schemathesis.BaseSchema:
    """The app in demo mode: the in-process simulator is its Freelancer, SQLite its store."""
    root: Path = tmp_path_factory.mktemp("fuzz")
    app = create_app(
        Settings(  # type: ignore[call-arg]
            _env_file=None,
            sqlite_path=root / "users.db",
            simulator_latency_ms=0,
            wait_timeout_s=2,
            upstream_rate_per_min=1_000_000,
            upstream_burst=1000,
        )
    )
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_endpoint_answers_as_documented(case: schemathesis.Case) -> None:
    # DELETE evicts from the cache; it does not delete the Freelancer user, so a later
    # GET of the same id rightly fetches it again: the use-after-free check does not apply.
    case.call_and_validate(excluded_checks=[schemathesis.checks.use_after_free])
