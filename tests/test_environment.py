"""The suite ignores the shell's settings: exported variables and a `.env` in the cwd.

A few canary tests run in a child pytest whose environment and working directory carry
settings that would break them if they were read (tests/conftest.py scrubs them).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
CANARIES = [
    # BATCH_SIZE=1 would split the batches, UPSTREAM_CONCURRENCY=1 and WAIT_TIMEOUT_S
    # would time the clients out.
    "tests/gateway/test_single_flight.py::test_concurrent_requests_fetch_each_id_once",
    # MONGODB_URL would replace the SQLite store with an unreachable MongoDB.
    "tests/gateway/test_single_flight.py::"
    "test_users_are_saved_to_the_store_and_served_from_it_after_memory_is_lost",
    "tests/test_factory.py::test_without_credentials_it_runs_in_demo_mode_on_the_simulator",
    # A plain Settings() would read the `.env` of the working directory.
    "tests/test_environment.py::test_settings_built_in_a_test_are_the_defaults",
]
HOSTILE = {
    "BATCH_SIZE": "1",
    "MONGODB_URL": "mongodb://127.0.0.1:1/x",
    "UPSTREAM_CONCURRENCY": "1",
    "WAIT_TIMEOUT_S": "0.001",
}


def test_settings_built_in_a_test_are_the_defaults() -> None:
    assert Settings() == Settings(_env_file=None)
    assert Settings().mongodb_url is None
    assert Settings().batch_size == 100


@pytest.mark.e2e  # a subprocess
def test_exported_settings_and_a_dot_env_do_not_change_test_results(tmp_path: Path) -> None:
    cwd = tmp_path / "shell"
    cwd.mkdir()
    (cwd / ".env").write_text(
        "MONGODB_URL=mongodb://127.0.0.1:1/from-dotenv\n"
        "SQLITE_PATH=/nonexistent/dir/users.db\n"
        "FREELANCER_API_BASE=http://127.0.0.1:1/api/users/0.1/users\n"
        "MEMORY_CACHE_SIZE=1000\n"
        "QUEUE_MAX=100\n"
    )
    # Lower case too: settings are read case-insensitively.
    env = {**os.environ, **HOSTILE, "store_save_attempts": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(ROOT),
            "-c",
            str(ROOT / "pyproject.toml"),
            *(str(ROOT / canary) for canary in CANARIES),
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=45,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"{len(CANARIES)} passed" in output, output
