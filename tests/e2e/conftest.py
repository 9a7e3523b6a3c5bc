"""Real processes on loopback: the gateway (`python -m app`) and the simulator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser

from tests.support.browser import launch_chromium
from tests.support.procs import Process, simulator_process
from tests.support.procs import gateway_process as start_gateway


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[Process]:
    """The standalone Freelancer simulator, 20 ms latency."""
    process = simulator_process(tmp_path, latency_ms=20)
    process.start("/_sim/stats")
    yield process
    process.stop()


@pytest.fixture
def gateway_process(tmp_path: Path, simulator: Process) -> Iterator[Process]:
    """`python -m app` on a free port, SQLite in tmp_path, calling the simulator (not started)."""
    process = start_gateway(tmp_path, simulator, LOG_LEVEL="INFO", SHUTDOWN_GRACE_S="5")
    yield process
    if process.popen is not None:
        process.stop()


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Headless Chromium (skipped, saying why, where Debian's package is not installed)."""
    yield from launch_chromium()
