"""Schemathesis against the app's own OpenAPI schema: no 5xx, every answer as documented."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from app.config import Settings
from app.main import create_app
from tests.conftest import scrub_settings_environment

if TYPE_CHECKING:
    from schemathesis.specs.openapi.schemas import OpenApiCase

# Built at import because schemathesis collects operations then (its fixture loader does
# not work with pytest 9); create_app opens nothing, schemathesis runs the lifespan. That
# is before any fixture runs, so the shell's settings are scrubbed here for the build.
ROOT = Path(tempfile.mkdtemp(prefix="gateway-fuzz-"))
with pytest.MonkeyPatch.context() as _env:
    scrub_settings_environment(_env)
    APP = create_app(
        Settings(
            _env_file=None,
            sqlite_path=ROOT / "users.db",
            simulator_latency_ms=0,  # demo mode: the in-process simulator is Freelancer
            wait_timeout_s=2,
            upstream_rate_per_min=1_000_000,
            upstream_burst=1000,
        )
    )
# A body over MAX_BODY_BYTES is rejected with 413 before it is parsed: a rejection too.
REJECTIONS = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]
CONFIG = schemathesis.Config.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": REJECTIONS}}}
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP, config=CONFIG)


@pytest.fixture(scope="module", autouse=True)
def _remove_store() -> Iterator[None]:
    yield
    shutil.rmtree(ROOT, ignore_errors=True)


@schema.parametrize()
# derandomize: CI gates on a fixed, reproducible set of examples.
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_endpoint_answers_as_documented(
    case: OpenApiCase,
) -> None:
    # Two checks do not fit this API, on purpose:
    # - use_after_free: DELETE evicts from the cache, it does not delete the Freelancer
    #   user, so a later GET of the same id rightly fetches it again;
    # - positive_data_acceptance: JSON Schema calls 2719.0 an integer, but the API refuses
    #   floats as ids (a float id is a client bug); tests/test_api_validation.py proves
    #   that well-formed ids are accepted.
    case.call_and_validate(
        excluded_checks=[
            schemathesis.checks.use_after_free,
            schemathesis.checks.positive_data_acceptance,
        ]
    )
