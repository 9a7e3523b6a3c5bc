"""What the workloads measure with and report in: RSS, timed lookups, percentiles, the
machine, the results table and the verdict (`python -m bench` and `python -m bench.jobs`)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
HOT_BATCH = 50
HOT_CONNECTIONS = 16
HOT_RUN_S = 3
HOT_ROUNDS = 3
BYTES_PER_USER_TARGET = 600


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def post_users(client: httpx.Client, url: str, ids: list[int]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    response = client.post(f"{url}/api/users", json={"user_ids": ids}, timeout=30)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return elapsed, body


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def machine() -> str:
    cpu = "unknown cpu"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // (1024 * 1024)
    return f"{cpu}, {os.cpu_count()} cores, {mem} GiB, Python {platform.python_version()}"


def table(results: dict[str, Any]) -> str:
    rows = [
        (
            "workload",
            "upstream calls",
            "lookups/unique",
            "wall s",
            "req/s",
            "p50 ms",
            "p99 ms",
            "RSS MB",
            "targets",
        )
    ]
    for name, r in results["workloads"].items():
        lookups = f"{r['upstream_lookups']}/{r['unique_ids']}" if "upstream_lookups" in r else "-"

        def num(key: str, fmt: str, r: dict[str, Any] = r) -> str:
            return format(r[key], fmt) if key in r else "-"

        failed = [k for k, ok in r.get("checks", {}).items() if not ok]
        rows.append(
            (
                name,
                str(r.get("upstream_calls", "-")),
                lookups,
                num("wall_s", ".2f"),
                num("rps", ".0f"),
                num("p50_ms", ".1f"),
                num("p99_ms", ".1f"),
                num("rss_mb", ".0f"),
                "ok" if not failed else "MISSED: " + "; ".join(failed),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def verdict(workloads: dict[str, Any]) -> int:
    """Print the targets missed (or that all were met); the exit status, 1 when any was."""
    missed = [
        f"{name}: {check}"
        for name, r in workloads.items()
        for check, ok in r.get("checks", {}).items()
        if not ok
    ]
    if missed:
        print("targets missed:\n  " + "\n  ".join(missed))
        return 1
    print("all targets met")
    return 0


def run_wrk(url: str, script: Path, seconds: int) -> dict[str, Any]:
    """wrk with 1 thread and HOT_CONNECTIONS connections; requests/s and latency."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{HOT_CONNECTIONS}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        match = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not match:
            raise RuntimeError(f"no {label} in wrk output:\n{out}")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "p50_ms": ms("50%"),
        "p99_ms": ms("99%"),
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median requests/s."""
    return sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]


def metric(process: Any, name: str) -> float:
    """One sample of a running process's /metrics (anything with a `url`)."""
    text = httpx.get(f"{process.url}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} ([\d.e+-]+)$", text, re.M)
    assert match is not None, name
    return float(match.group(1))


def wait_saved(process: Any, within_s: float = 120.0) -> float:
    """Wait (bounded) until a gateway has saved every user it fetched; the seconds waited.

    A workload that follows the warm-up is measured once its saves are done: 100 000
    users written behind in the background are the warm-up's cost, not the next one's.
    """
    started = time.perf_counter()
    while metric(process, "gateway_store_unsaved") > 0:
        if time.perf_counter() - started > within_s:
            raise RuntimeError(f"the gateway still had users to save after {within_s:.0f} s")
        time.sleep(0.2)
    return time.perf_counter() - started


def columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells as text in aligned columns (the first row the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )
