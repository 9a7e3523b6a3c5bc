"""Crawl-job workloads of `make bench` (`python -m bench.jobs`: only these), each on its own
simulator and gateway: a 10 000-id job and one miss while another runs; a job under the
minute budget and a lowered hour window; a 10 000 000-id range job's memory growth."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.measure import machine, post_users, rss_mb, table, verdict
from tests.support.procs import (
    Process,
    gateway_process,
    sim_configure,
    sim_stats,
    simulator_process,
)

JOB_IDS = 10_000
JOB_FIRST_ID = 20_000_001
JOB_TARGET_S = 5.0
JOB_WAIT_S = 60.0
POLL_S = 0.05
MISSES = 20
MISS_FIRST_ID = 30_000_001
MISS_LATENCY_MS = 100.0
MISS_SLACK_MS = 30.0
BUDGET_RUN_S = 75.0
# The default minute budget, and an hour window low enough to bind within the run.
# Freelancer's limits, the defaults. The hour cannot bind in a bench-length run; it is
# checked over two simulated hours in tests/gateway/test_budget.py.
BUDGET = {"UPSTREAM_RATE_PER_MIN": "50", "UPSTREAM_BURST": "10", "UPSTREAM_RATE_PER_HOUR": "1000"}
RANGE_LAST = 10_000_000
SAMPLE_EVERY_S = 10.0
GROWTH_TARGET_MB = 50.0
FINISHED = ("completed", "failed", "cancelled")
Json = dict[str, Any]
Procs = tuple[httpx.Client, Process, Process]


@contextmanager
def processes(latency_ms: float, **settings: str) -> Iterator[Procs]:
    """A client of a gateway, the gateway, its simulator (in a temporary directory)."""
    with tempfile.TemporaryDirectory(prefix="gateway-bench-jobs-") as tmp:
        work = Path(tmp)
        sim = simulator_process(work, latency_ms=latency_ms)
        gateway = gateway_process(work, sim, **settings)
        sim.start("/_sim/stats")
        try:
            gateway.start()
            try:
                with httpx.Client(base_url=gateway.url, timeout=30) as client:
                    yield client, gateway, sim
            finally:
                gateway.stop()
        finally:
            sim.stop()


def submit(client: httpx.Client, body: dict[str, Any]) -> str:
    response = client.post("/api/jobs", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def wait_for(client: httpx.Client, job_id: str, statuses: Sequence[str], limit_s: float) -> Json:
    """Poll the job until its status is one of `statuses`, or `limit_s` passed; its view."""
    deadline = time.monotonic() + limit_s
    while True:
        view: Json = client.get(f"/api/jobs/{job_id}").raise_for_status().json()
        if view["status"] in statuses or time.monotonic() >= deadline:
            return view
        time.sleep(POLL_S)


def cancel(client: httpx.Client, job_id: str) -> Json:
    """Cancel the job if it is still active (409: it ended on its own); its view."""
    response = client.post(f"/api/jobs/{job_id}/cancel")
    if response.status_code == 409:
        return wait_for(client, job_id, FINISHED, 0)
    return dict(response.raise_for_status().json())


def miss_latencies(client: httpx.Client, first_id: int) -> list[float]:
    """MISSES sequential single-id requests for ids never asked before, in seconds."""
    return [post_users(client, "", [uid])[0] for uid in range(first_id, first_id + MISSES)]


def job_10k() -> dict[str, Any]:
    """A 10 000-id job, then misses at 100 ms latency: idle, and while another job runs."""
    ids = list(range(JOB_FIRST_ID, JOB_FIRST_ID + JOB_IDS))
    with processes(0.0) as (client, _, sim):
        before = sim_stats(sim)
        started = time.perf_counter()
        job_id = submit(client, {"user_ids": ids})
        view = wait_for(client, job_id, FINISHED, JOB_WAIT_S)
        wall = time.perf_counter() - started
        after = sim_stats(sim)
        sim_configure(sim, latency_ms=MISS_LATENCY_MS)
        idle = miss_latencies(client, MISS_FIRST_ID)
        second = submit(client, {"user_ids": [i + JOB_IDS for i in ids]})
        running = wait_for(client, second, ("running", *FINISHED), JOB_WAIT_S)
        busy = miss_latencies(client, MISS_FIRST_ID + MISSES)
        last = cancel(client, second)
    calls = after["calls"] - before["calls"]
    lookups = after["ids_requested"] - before["ids_requested"]
    idle_p50 = statistics.median(idle) * 1000
    busy_p50 = statistics.median(busy) * 1000
    throughout = running["status"] == "running" and last["done"] < last["total"]
    return {
        "job (10 000 ids)": {
            "status": view["status"],
            "upstream_calls": calls,
            "upstream_lookups": lookups,
            "unique_ids": JOB_IDS,
            "wall_s": wall,
            "done": view["done"],
            "ids_per_s": view["done"] / wall,
            "job_upstream_calls": view["upstream_calls"],
            "checks": {
                "completed": view["status"] == "completed",
                f"exactly {JOB_IDS // 100} upstream calls": calls == JOB_IDS // 100,
                f"{JOB_IDS} look-ups": lookups == JOB_IDS,
                f"wall <= {JOB_TARGET_S:.0f} s": wall <= JOB_TARGET_S,
            },
        },
        "one miss, during a job (sim 100 ms)": {
            "requests": MISSES,
            "p50_ms": busy_p50,
            "p99_ms": max(busy) * 1000,
            "idle_p50_ms": idle_p50,
            "idle_p99_ms": max(idle) * 1000,
            "checks": {
                f"p50 <= idle p50 + {MISS_SLACK_MS:.0f} ms": busy_p50 <= idle_p50 + MISS_SLACK_MS,
                "the job ran throughout": throughout,
            },
        },
    }


def job_budget() -> dict[str, Any]:
    """A 10 000-id job under BUDGET for BUDGET_RUN_S, cancelled: the calls by window."""
    with processes(0.0, BATCH_SIZE="100", **BUDGET) as (client, _, sim):
        before = sim_stats(sim)
        started = time.perf_counter()
        job_id = submit(client, {"user_ids": list(range(JOB_FIRST_ID, JOB_FIRST_ID + JOB_IDS))})
        wait_for(client, job_id, FINISHED, BUDGET_RUN_S)
        wall = time.perf_counter() - started
        view = cancel(client, job_id)
        after = sim_stats(sim)
    calls = after["calls"] - before["calls"]
    per_min, per_hour = after["max_calls_in_60s"], after["max_calls_in_3600s"]
    return {
        "upstream_calls": calls,
        "upstream_lookups": after["ids_requested"] - before["ids_requested"],
        "unique_ids": after["unique_ids"] - before["unique_ids"],
        "wall_s": wall,
        "max_calls_in_60s": per_min,
        "max_calls_in_3600s": per_hour,
        "done": view["done"],
        "checks": {
            "<= 50 calls in any 60 s": per_min <= 50,
            "<= 1000 calls in any 3600 s": per_hour <= 1000,
            # The hour binds a long job: its burst less the reserve left to clients (5),
            # then (1000 - 10) / 3600 calls a second: 25.6 in 75 s.
            ">= 23 calls (the job kept the hour's pace)": calls >= 23,
        },
    }


def job_range_memory(seconds: float) -> dict[str, Any]:
    """A 10 000 000-id range job, the gateway's RSS sampled for `seconds`; then cancelled."""
    with processes(0.0) as (client, gateway, sim):
        before = sim_stats(sim)
        started = time.perf_counter()
        job_id = submit(client, {"id_range": [1, RANGE_LAST]})
        samples = [rss_mb(gateway.pid)]
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(SAMPLE_EVERY_S, left))
            samples.append(rss_mb(gateway.pid))
        view = cancel(client, job_id)
        wall = time.perf_counter() - started
        after = sim_stats(sim)
    growth = max(samples) - samples[0]
    return {
        "upstream_calls": after["calls"] - before["calls"],
        "upstream_lookups": after["ids_requested"] - before["ids_requested"],
        "unique_ids": after["unique_ids"] - before["unique_ids"],
        "wall_s": wall,
        "done": view["done"],
        "ids_per_s": view["done"] / wall,
        "rss_mb": max(samples),
        "baseline_rss_mb": samples[0],
        "growth_mb": growth,
        "rss_samples_mb": [round(s, 1) for s in samples],
        "checks": {f"RSS growth <= {GROWTH_TARGET_MB:.0f} MB": growth <= GROWTH_TARGET_MB},
    }


def run(seconds: float) -> dict[str, Any]:
    """Every job workload, by table row."""
    workloads = job_10k()
    workloads["job under budget (75 s)"] = job_budget()
    workloads[f"job range memory ({seconds:.0f} s)"] = job_range_memory(seconds)
    return workloads


def summary(workloads: dict[str, Any]) -> list[str]:
    """The job figures the table has no column for, one line a workload."""
    lines = []
    for name, r in workloads.items():
        if "max_calls_in_60s" in r:
            lines.append(
                f"{name}: {r['upstream_calls']} calls, at most {r['max_calls_in_60s']} in any "
                f"60 s and {r['max_calls_in_3600s']} in any 3600 s; {r['done']} ids done"
            )
        elif "growth_mb" in r:
            lines.append(
                f"{name}: {r['done']} ids done, {r['ids_per_s']:.0f} ids/s; RSS "
                f"{r['baseline_rss_mb']:.0f} MB after submission, max {r['rss_mb']:.0f} MB, "
                f"growth {r['growth_mb']:.1f} MB"
            )
        elif "ids_per_s" in r:
            lines.append(f"{name}: {r['done']} ids done, {r['ids_per_s']:.0f} ids/s")
        elif "idle_p50_ms" in r:
            lines.append(f"{name}: p50 {r['p50_ms']:.1f} ms vs {r['idle_p50_ms']:.1f} ms idle")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__)
    parser.add_argument("--job-seconds", type=float, default=30.0)
    args = parser.parse_args()
    workloads = run(args.job_seconds)
    print(f"machine: {machine()}")
    print(table({"workloads": workloads}))
    print("\n".join(summary(workloads)))
    return verdict(workloads)


if __name__ == "__main__":
    sys.exit(main())
