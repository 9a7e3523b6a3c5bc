"""Protected mode, as an operator meets it: `python -m app` refuses to start open."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_the_gateway_refuses_to_serve_open_on_a_reachable_address(tmp_path: Path) -> None:
    env = {**os.environ, "HOST": "0.0.0.0", "SQLITE_PATH": str(tmp_path / "users.db")}
    result = subprocess.run(
        [sys.executable, "-m", "app"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "API_KEYS" in result.stderr and "AUTH_DISABLED=true" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "users.db").exists(), "nothing was opened"
