"""Crawl jobs on real processes: a SIGKILL mid-job, a restart, and the command line."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.procs import Process, sim_configure, sim_stats

pytestmark = pytest.mark.e2e

IDS = list(range(500_001, 503_001))
MISSING = {i for i in IDS if i % 97 == 0}  # the simulator has no user whose id 97 divides


def job(process: Process, job_id: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{process.url}/api/jobs/{job_id}", timeout=10).json()
    return body


def wait_until(process: Process, job_id: str, done: int, within_s: float) -> dict[str, Any]:
    """The job once `done` ids are done (and the runner has had its say), or once it ended."""
    deadline = time.monotonic() + within_s
    while True:
        state = job(process, job_id)
        ended = state["status"] in ("completed", "failed", "cancelled")
        if ended or (state["done"] >= done and done < state["total"]):
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.05)


def test_a_job_killed_mid_way_resumes_after_a_restart_without_refetching(
    gateway_process: Process, simulator: Process
) -> None:
    sim_configure(simulator, latency_ms=150)
    gateway_process.start()
    before = sim_stats(simulator)
    submitted = httpx.post(f"{gateway_process.url}/api/jobs", json={"user_ids": IDS}, timeout=10)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]
    midway = wait_until(gateway_process, job_id, 600, within_s=30)
    assert midway["status"] == "running" and midway["done"] < len(IDS), midway
    assert gateway_process.popen is not None
    os.kill(gateway_process.popen.pid, signal.SIGKILL)
    gateway_process.popen.wait(10)

    gateway_process.start()
    finished = wait_until(gateway_process, job_id, len(IDS), within_s=60)
    assert finished["status"] == "completed", finished
    assert (finished["found"], finished["not_found"]) == (len(IDS) - len(MISSING), len(MISSING))
    after = sim_stats(simulator)
    looked_up = after["ids_requested"] - before["ids_requested"]
    assert after["unique_ids"] - before["unique_ids"] == len(IDS), "no id was lost"
    # The chunks in the air when the process died (at most UPSTREAM_CONCURRENCY - 1 = 3
    # batches) are the only ids that may have gone upstream twice.
    assert looked_up - len(IDS) <= 300, looked_up

    results = httpx.get(
        f"{gateway_process.url}/api/jobs/{job_id}/results",
        params={"format": "csv", "include": "missing"},
        timeout=30,
    )
    rows = list(csv.DictReader(io.StringIO(results.text)))
    assert sorted(int(r["user_id"]) for r in rows) == IDS
    assert {int(r["user_id"]) for r in rows if r["status"] == "not_found"} == MISSING


def run_cli(process: Process, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATEWAY_URL": process.url}
    return subprocess.run(
        [sys.executable, "-m", "app", "jobs", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_the_command_line_submits_waits_and_downloads(
    gateway_process: Process, simulator: Process, tmp_path: Path
) -> None:
    gateway_process.start()
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("# a crawl\n" + "\n".join(str(i) for i in range(1, 251)) + "\n")
    submitted = run_cli(gateway_process, "submit", str(ids_file), "--label", "cli", "--wait")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    state = job(gateway_process, job_id)
    assert (state["status"], state["label"], state["total"]) == ("completed", "cli", 250)

    out = tmp_path / "users.csv"
    fetched = run_cli(gateway_process, "results", job_id, "--format", "csv", "-o", str(out))
    assert fetched.returncode == 0, fetched.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 250 - 2  # 97 and 194 do not exist
    assert rows[0]["username"]

    missing = run_cli(gateway_process, "status", "no-such-job")
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and missing.stderr.startswith("error: ")
    ranged = run_cli(gateway_process, "submit", "--range", "1000", "1099", "--wait")
    assert ranged.returncode == 0, ranged.stderr
    assert job(gateway_process, ranged.stdout.strip())["found"] == 99  # 1067 = 97 * 11
    listed = run_cli(gateway_process, "list")
    assert listed.returncode == 0 and job_id in listed.stdout
