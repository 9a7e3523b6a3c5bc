"""The deployment files: docker-compose.yml (both profiles) is valid for a compose tool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e  # runs docker-compose

ROOT = Path(__file__).resolve().parents[1]


def compose(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed (make test installs it when run as root)")
    return subprocess.run(
        [tool, "-f", str(ROOT / "docker-compose.yml"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_the_default_compose_file_is_valid_and_scale_is_opt_in() -> None:
    result = compose("config")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    profiled = {
        name for name, service in services.items() if "scale" in service.get("profiles", [])
    }
    assert profiled == {"redis", "mongo-rs", "gateway", "nginx"}
    assert set(services) - profiled == {"mongo", "app"}


def test_the_scale_profile_has_redis_replicas_and_nginx_with_health_checks() -> None:
    result = compose("--profile", "scale", "config")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    gateway = services["gateway"]
    assert gateway["deploy"]["replicas"] == 3
    assert gateway["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert "replicaSet=rs0" in gateway["environment"]["MONGODB_URL"]
    assert set(gateway["depends_on"]) == {"redis", "mongo-rs"}
    # The gateway's health check is its image's (Dockerfile HEALTHCHECK); the rest here.
    for name in ("redis", "mongo-rs", "nginx", "mongo"):
        assert "test" in services[name]["healthcheck"], name
    assert "HEALTHCHECK" in (ROOT / "Dockerfile").read_text()
    published = [port for spec in services.values() for port in spec.get("ports", [])]
    assert published and all(str(port).startswith("127.0.0.1:") for port in published)
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    assert nginx.count("proxy_pass http://gateways") == 2
    # The replicas believe X-Forwarded-For from nginx's own address only, and nginx
    # writes it from the peer it saw (never passing on what a client wrote).
    assert nginx.count("proxy_set_header X-Forwarded-For $remote_addr;") == 2
    assert "$proxy_add_x_forwarded_for" not in nginx
    address = services["nginx"]["networks"]["scale"]["ipv4_address"]
    assert gateway["environment"]["FORWARDED_ALLOW_IPS"] == address
