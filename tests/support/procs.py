"""Child processes serving HTTP on loopback, for the end-to-end tests and the benchmark."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

STARTUP_S = 40.0
STOP_S = 20.0


def free_port() -> int:
    """A port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Process:
    """A child process serving HTTP on 127.0.0.1:port, with its output in a log file."""

    args: list[str]
    port: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self, ready_path: str = "/healthz", within_s: float = STARTUP_S) -> None:
        """Start it and wait (at most `within_s`) until `ready_path` answers 200."""
        env = {**os.environ, **self.env}
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.args, env=env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.args} exited early:\n{self.output()}")
            try:
                if httpx.get(self.url + ready_path, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.popen.kill()  # not left running (nor warned about) behind the failure
        self.popen.wait(STOP_S)
        raise AssertionError(f"{self.args} did not start in {within_s} s:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send `sig`, wait at most STOP_S for the exit (kill after that); the exit code."""
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(STOP_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_S)
                raise AssertionError(
                    f"{self.args} ignored signal {sig}:\n{self.output()}"
                ) from None
        return self.popen.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def simulator_process(work: Path, *, latency_ms: float) -> Process:
    """The Freelancer simulator as its own process (not started), logging into `work`."""
    port = free_port()
    args = [sys.executable, "-m", "app.simulator", "--port", str(port)]
    return Process([*args, "--latency-ms", str(latency_ms)], port, work / "sim.log", cwd=work)


def sim_stats(sim: Process) -> dict[str, Any]:
    """What the simulator process was asked (`GET /_sim/stats`)."""
    stats: dict[str, Any] = httpx.get(f"{sim.url}/_sim/stats", timeout=5).json()
    return stats


def sim_configure(sim: Process, **config: Any) -> None:
    """Change the simulator process's behaviour (`POST /_sim/config`)."""
    httpx.post(f"{sim.url}/_sim/config", json=config, timeout=5).raise_for_status()


def gateway_process(work: Path, simulator: Process, **settings: str) -> Process:
    """`python -m app` (not started) on SQLite in `work`, calling `simulator`.

    The token bucket and the per-client limits are opened wide: the simulator is not
    Freelancer and the load generator is one client; what is measured is the gateway, not
    the budgets (both are unit-tested on a fake clock).
    `settings` override any of these, by setting name.
    """
    port = free_port()
    env = {
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "SQLITE_PATH": str(work / "data" / "users.db"),
        "FREELANCER_API_BASE": f"{simulator.url}/api/users/0.1/users",
        "UPSTREAM_RATE_PER_MIN": "1000000",
        "UPSTREAM_RATE_PER_HOUR": "1000000000",
        "UPSTREAM_BURST": "1000",
        # One load generator is one client: its limits must not be what is measured.
        "RATE_LIMIT_PER_MIN": "1000000000",
        "RATE_LIMIT_IDS_PER_MIN": "1000000000",
        "KEY_MISSES_PER_MIN": "1000000000",
        "LOG_LEVEL": "WARNING",
        **settings,
    }
    # cwd=work: no .env from the repository is read.
    return Process([sys.executable, "-m", "app"], port, work / "gateway.log", env=env, cwd=work)


REDIS_STARTUP_S = 10.0


@dataclass
class RedisServer:
    """A real redis-server on a free loopback port; it can be stopped, restarted or frozen."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it (again, on the same port) and wait until it answers PING."""
        binary = shutil.which("redis-server")
        assert binary is not None
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + REDIS_STARTUP_S
        while time.monotonic() < deadline:
            if self.ping():
                return
            time.sleep(0.02)
        raise AssertionError(f"redis-server did not answer on port {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop it (SIGKILL: no goodbye to the clients), and wait for the exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


def assert_clean_exit(process: Process) -> None:
    """SIGTERM, then: lifespan shut down, the signal re-raised by uvicorn (or 0), no noise."""
    code = process.stop(signal.SIGTERM)
    log = process.output()
    assert code in (0, -signal.SIGTERM), log
    assert "gateway stopped" in log and "Application shutdown complete" in log, log
    for bad in ("Task was destroyed", "Unclosed", "Traceback", "never retrieved"):
        assert bad not in log, log
