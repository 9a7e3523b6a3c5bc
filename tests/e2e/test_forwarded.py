"""Forwarded headers name the client only from FORWARDED_ALLOW_IPS, through a real uvicorn.

uvicorn itself trusts `X-Forwarded-For` from loopback by default: a local caller that
sends a new header each time would be a new client each time, and never meet its limit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from tests.support.procs import Process, free_port, gateway_process

pytestmark = pytest.mark.e2e

LIMIT = {"RATE_LIMIT_PER_MIN": "20", "SIMULATOR_LATENCY_MS": "0"}


def statuses(url: str) -> list[int]:
    """30 requests, each forwarded "for" a different address."""
    with httpx.Client(base_url=url, timeout=10) as client:
        return [
            client.get("/api/queue", headers={"X-Forwarded-For": f"203.0.113.{n}"}).status_code
            for n in range(30)
        ]


def demo_gateway(work: Path, **settings: str) -> Process:
    """`python -m app` in demo mode (its own simulator) with `settings`."""
    process = gateway_process(work, Process([], 0, work / "none.log"), **LIMIT, **settings)
    process.env.pop("FREELANCER_API_BASE")
    return process


def test_python_m_app_trusts_no_proxy_by_default(tmp_path: Path) -> None:
    gateway = demo_gateway(tmp_path)
    gateway.start()
    try:
        answered = statuses(gateway.url)
    finally:
        gateway.stop()
    assert answered.count(200) == 20 and answered.count(429) == 10, answered


def test_plain_uvicorn_trusting_loopback_still_counts_one_client(tmp_path: Path) -> None:
    """The README tells plain uvicorn users to pass --forwarded-allow-ips; if they do not,
    uvicorn believes loopback's header, and the gateway counts every request that says it
    was forwarded as one client."""
    port = free_port()
    args = [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port)]
    env = {"SQLITE_PATH": str(tmp_path / "users.db"), **LIMIT}
    server = Process(args, port, tmp_path / "uvicorn.log", env=env, cwd=tmp_path)
    server.start()
    try:
        answered = statuses(server.url)
    finally:
        server.stop()
    assert answered.count(200) == 20 and answered.count(429) == 10, answered


def test_a_trusted_proxy_names_the_client(tmp_path: Path) -> None:
    """FORWARDED_ALLOW_IPS reaches uvicorn through `python -m app`: each forwarded address
    is its own client, under its own limit."""
    gateway = demo_gateway(tmp_path, FORWARDED_ALLOW_IPS="127.0.0.1")
    gateway.start()
    try:
        answered = statuses(gateway.url)
        stats = httpx.get(f"{gateway.url}/api/stats", timeout=10).json()
    finally:
        gateway.stop()
    assert answered == [200] * 30
    names = {row["name"] for row in stats["keys"]}
    assert {"ip:203.0.113.0", "ip:203.0.113.29"} <= names
