"""Schemathesis against the app's own OpenAPI schema, with every check it has (the CLI's
`--checks all`): examples per operation, then the stateful phase along the schema's links."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import CHECKS, load_all_checks

from app.config import Settings
from app.jobs.runner import JobRunner
from app.jobs.webhook import Webhooks
from app.main import create_app
from tests.support import fuzz_hooks  # noqa: F401  (registers the shared hooks)
from tests.support.apps import scrub_settings_environment

pytestmark = pytest.mark.fuzz

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
            upstream_rate_per_hour=1_000_000_000,
            upstream_burst=1000,
            # The client limits are off: a 429 here would be our pace, not the contract's.
            rate_limit_per_min=1_000_000,
            rate_limit_ids_per_min=100_000_000,
            key_misses_per_min=100_000_000,
            job_max_range=1000,  # the jobs fuzzing submits are crawled in the background
            webhook_secret="fuzz-secret",
            webhook_allow_private=True,  # callbacks go to a closed loopback port (below)
            # Schemathesis' ASGI client names its server and Host `testserver`, no socket.
            allowed_hosts="testserver",
            auth_disabled=True,
        )
    )
# A body over MAX_BODY_BYTES is rejected with 413 before it is parsed: a rejection too.
REJECTIONS = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]
# `enabled: true` turns on every check, as `--checks all` does on the command line.
CONFIG = schemathesis.Config.from_dict(
    {"checks": {"enabled": True, "negative_data_rejection": {"expected-statuses": REJECTIONS}}}
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP, config=CONFIG)


class StateMachine(schema.as_state_machine()):  # type: ignore[misc]
    def setup(self) -> None:
        """Each scenario starts with no jobs. A job's answers depend on what happened to it
        (a second cancel is 409), and Hypothesis replays a scenario's start expecting the
        same answers; jobs left by an earlier scenario would change them."""
        with closing(sqlite3.connect(ROOT / "users.db", timeout=10)) as db, db:
            db.execute("DELETE FROM job_items")
            db.execute("DELETE FROM jobs")


@pytest.fixture(scope="module", autouse=True)
def _remove_store() -> Iterator[None]:
    yield
    shutil.rmtree(ROOT, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _jobs_stand_still() -> Iterator[None]:
    """Submitted jobs stay pending and call nobody back: a job that ran would answer a
    later cancel 200 or 409 by timing, and Hypothesis replays a stateful run expecting the
    same answers (callbacks are tested against a real receiver in tests/jobs)."""

    async def no_round(self: JobRunner) -> bool:
        return False

    async def no_callbacks(self: Webhooks) -> None:
        return None

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(JobRunner, "_round", no_round)
        patch.setattr(Webhooks, "run", no_callbacks)
        yield


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
