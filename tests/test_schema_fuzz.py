"""Schemathesis against the app's own OpenAPI schema, with every check it has (the CLI's
`--checks all`): examples per operation, then the stateful phase along the schema's links."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.openapi.checks import RejectedPositiveData, UseAfterFree

from app.config import Settings
from app.main import create_app
from tests.conftest import scrub_settings_environment

if TYPE_CHECKING:
    from schemathesis import HookContext, Response
    from schemathesis.core.failures import Failure
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
            upstream_rate_per_hour=1_000_000_000,
            upstream_burst=1000,
            # The client limits are off: a 429 here would be our pace, not the contract's.
            rate_limit_per_min=1_000_000,
            rate_limit_ids_per_min=100_000_000,
            key_misses_per_min=100_000_000,
            job_max_range=1000,  # the jobs fuzzing submits are crawled in the background
            webhook_secret="fuzz-secret",
        )
    )
# A body over MAX_BODY_BYTES is rejected with 413 before it is parsed: a rejection too.
REJECTIONS = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]
# `enabled: true` turns on every check, as `--checks all` does on the command line.
CONFIG = schemathesis.Config.from_dict(
    {"checks": {"enabled": True, "negative_data_rejection": {"expected-statuses": REJECTIONS}}}
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP, config=CONFIG)


@schema.hook
def filter_failure(
    context: HookContext, failure: Failure, case: OpenApiCase, response: Response
) -> bool:
    """Accept two findings. The first is on the deprecated path only (it goes in the next
    release).

    `DELETE /api/users/{id}` evicts the user from the cache, it does not delete the
    Freelancer user, so a later `GET /api/users/{id}` rightly fetches it again; that is
    why eviction moved to `DELETE /api/cache/users/{id}`, which use_after_free leaves be.
    """
    if isinstance(failure, UseAfterFree) and failure.free.startswith("DELETE /api/users/"):
        return False
    # An id_range's order and size are rules JSON Schema cannot state (the description does).
    return not (
        isinstance(failure, RejectedPositiveData)
        and case.path == "/api/jobs"
        and any(rule in response.text for rule in ("first <= last", "JOB_MAX_RANGE"))
    )


@schemathesis.hook
def before_call(context: HookContext, case: OpenApiCase, **kwargs: Any) -> None:
    """Callbacks go to a closed loopback port: tests reach nothing beyond this machine."""
    for where in (case.body, case.query):
        if isinstance(where, dict) and isinstance(where.get("callback_url"), str):
            where["callback_url"] = "http://127.0.0.1:9/fuzz"


StateMachine = schema.as_state_machine()


@pytest.fixture(scope="module", autouse=True)
def _remove_store() -> Iterator[None]:
    yield
    shutil.rmtree(ROOT, ignore_errors=True)


def test_every_check_is_enabled() -> None:
    load_all_checks()
    config = schema.config.checks_config_for()
    disabled = [n for n in CHECKS.get_all_names() if not config.get_by_name(name=n).enabled]
    assert disabled == []


@schema.parametrize()
# derandomize: CI gates on a fixed, reproducible set of examples.
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_endpoint_answers_as_documented(case: OpenApiCase) -> None:
    case.call_and_validate()


def test_links_between_operations_hold() -> None:
    """The stateful phase: sequences along the schema's links, every check on every step."""
    StateMachine.run(
        settings=settings(
            max_examples=25,
            stateful_step_count=6,
            deadline=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
    )
