"""Protected mode, as an operator meets it: `python -m app` refuses to start open on a
reachable HOST, and however the server was started, an open gateway serves only requests
that reach it on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.procs import Process, free_port

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


def own_address() -> str | None:
    """This machine's address on its default route, if it has one. A UDP `connect` sends
    nothing; packets to one's own address never leave the machine."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 9))
            address: str = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def uvicorn_process(work: Path, *extra: str, **settings: str) -> Process:
    """`uvicorn app.main:app --host 0.0.0.0` as an operator would start it: no HOST setting."""
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "0.0.0.0"]
    env = {"SQLITE_PATH": str(work / "users.db"), "SIMULATOR_LATENCY_MS": "0", **settings}
    return Process(
        [*args, "--port", str(port), *extra], port, work / "uvicorn.log", env=env, cwd=work
    )


def wait_for_line(process: Process, *words: str, within_s: float = 15) -> str:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        for line in process.output().splitlines():
            if all(word in line for word in words):
                return line
        time.sleep(0.05)
    raise AssertionError(f"no line with {words}:\n{process.output()}")


@pytest.mark.parametrize("workers", [None, "2"])
def test_plain_uvicorn_on_every_interface_serves_this_machine_only(
    tmp_path: Path, workers: str | None
) -> None:
    """Protected mode judges the sockets the server listens on, not the HOST setting."""
    server = uvicorn_process(tmp_path, *(["--workers", workers] if workers else []))
    server.start()
    try:
        line = wait_for_line(server, "refusing to serve without API keys on 0.0.0.0:")
        assert "API_KEYS" in line and "AUTH_DISABLED=true" in line
        # This machine, on loopback: served.
        assert httpx.get(f"{server.url}/api/stats", timeout=10).status_code == 200
        address = own_address()
        if address is not None:  # reached on another interface: refused, saying why
            answer = httpx.get(f"http://{address}:{server.port}/api/stats", timeout=10)
            assert answer.status_code == 403, answer.text
            detail = answer.json()["detail"]
            assert "API_KEYS" in detail and "AUTH_DISABLED=true" in detail
            posted = httpx.post(
                f"http://{address}:{server.port}/api/users", json={"user_ids": [1]}, timeout=10
            )
            assert posted.status_code == 403
    finally:
        server.stop()  # uvicorn exits by the signal it was stopped with, after shutting down
    assert "Traceback" not in server.output()


def test_auth_disabled_serves_every_interface(tmp_path: Path) -> None:
    address = own_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    server = uvicorn_process(tmp_path, AUTH_DISABLED="true", ALLOWED_HOSTS=address)
    server.start()
    try:
        answer = httpx.get(f"http://{address}:{server.port}/api/stats", timeout=10)
        assert answer.status_code == 200, answer.text
    finally:
        server.stop()
    assert "refusing to serve" not in server.output()
