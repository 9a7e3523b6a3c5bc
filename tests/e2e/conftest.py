"""Real processes on loopback: the gateway (`python -m app`) and the simulator."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.procs import Process, simulator_process
from bench.procs import gateway_process as start_gateway


def assert_clean_exit(process: Process) -> None:
    """SIGTERM, then: lifespan shut down, the signal re-raised by uvicorn (or 0), no noise."""
    code = process.stop(signal.SIGTERM)
    log = process.output()
    assert code in (0, -signal.SIGTERM), log
    assert "gateway stopped" in log and "Application shutdown complete" in log, log
    for bad in ("Task was destroyed", "Unclosed", "Traceback", "never retrieved"):
        assert bad not in log, log


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
