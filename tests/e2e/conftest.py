"""Real processes on loopback: the gateway (`python -m app`) and the simulator."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.procs import Process, free_port


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
    port = free_port()
    process = Process(
        [sys.executable, "-m", "app.simulator", "--port", str(port), "--latency-ms", "20"],
        port,
        tmp_path / "simulator.log",
    )
    process.start("/_sim/stats")
    yield process
    process.stop()


@pytest.fixture
def gateway_process(tmp_path: Path, simulator: Process) -> Iterator[Process]:
    """`python -m app` on a free port, SQLite in tmp_path, calling the simulator (not started)."""
    port = free_port()
    process = Process(
        [sys.executable, "-m", "app"],
        port,
        tmp_path / "gateway.log",
        env={
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "SQLITE_PATH": str(tmp_path / "data" / "users.db"),
            "FREELANCER_API_BASE": f"{simulator.url}/api/users/0.1/users",
            "UPSTREAM_RATE_PER_MIN": "6000",
            "UPSTREAM_BURST": "100",
            "LOG_LEVEL": "INFO",
            "SHUTDOWN_GRACE_S": "5",
        },
        cwd=tmp_path,  # no stray .env from the repository is read
    )
    yield process
    if process.popen is not None:
        process.stop()
