"""One chaos run: start the deployment, drive the clients, inflict the schedule's faults,
let it go quiet, read what every part says, and check it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from app.simulator.ledger import read_ledger
from tests.chaos import history
from tests.chaos.checker import Report, RunData, check
from tests.chaos.cluster import LEASE_S, Cluster, FaultRecord
from tests.chaos.load import CLIENT_SLACK_S, Load
from tests.chaos.schedule import KINDS, Kind, make_schedule
from tests.chaos.table import render

QUIESCE_S = 45.0
"""After the faults: at most this long for the deployment to come together, go idle and
finish its jobs and callbacks."""
STATS_SAMPLES = 6
"""/api/stats asked this often of each server (W's two workers answer in turn, by chance)."""


async def run_chaos(
    *,
    seed: int,
    seconds: float,
    work: Path,
    clients: int = 6,
    job_every_s: float = 60.0,
    job_ids: int = 300,
    kinds: tuple[Kind, ...] = KINDS,
    say: Callable[[str], None] = print,
) -> Report:
    """Run for `seconds` of faults from `seed`; the checked report."""
    schedule = make_schedule(seed, seconds, kinds=kinds)
    say(f"chaos: seed {seed}, {seconds:.0f} s, {len(schedule)} faults, work in {work}")
    for fault in schedule:
        say(f"  scheduled: {fault.describe()}")
    cluster = Cluster(work)
    records: list[FaultRecord] = []
    try:
        await cluster.start()
        load = Load(cluster, seed, clients)
        clients_done = asyncio.create_task(load.run(job_every_s=job_every_s, job_ids=job_ids))
        start = time.time()
        for fault in schedule:
            await _sleep_until(start + fault.at_s)
            record = await cluster.apply(fault)
            records.append(record)
            say(
                f"  done: {fault.describe()} (real {record.end - record.start:.1f} s) {record.note}"
            )
        await _sleep_until(start + seconds)
        load.stop.set()
        async with asyncio.timeout(CLIENT_SLACK_S + 20):
            await clients_done
        end = time.time()
        say("chaos: faults over; waiting for the deployment to settle")
        data = await _settle_and_read(cluster, load, records, seed, start, end)
    finally:
        await cluster.stop()
    data.pids = dict(cluster.pids)
    data.dead = dict(cluster.dead)
    history.save(data, work)
    data.ledger = read_ledger(cluster.ledger_path)
    report = check(data)
    text = render(report)
    (work / "report.txt").write_text(text + "\n")
    say(text)
    return report


async def _settle_and_read(
    cluster: Cluster,
    load: Load,
    records: list[FaultRecord],
    seed: int,
    start: float,
    end: float,
) -> RunData:
    cluster.resume_everything()
    deadline = time.monotonic() + QUIESCE_S
    coordinated: str | None = None
    try:
        await cluster.until_coordinated(within_s=QUIESCE_S / 2)
    except AssertionError as exc:
        coordinated = str(exc)
    async with httpx.AsyncClient(timeout=5) as http:
        views = await _until_idle(cluster, load, http, deadline)
        memory: dict[str, list[int]] = {name: [] for name in cluster.servers}
        for _ in range(STATS_SAMPLES):
            for name in cluster.servers:
                with contextlib.suppress(httpx.HTTPError):
                    stats = await cluster.get_json(http, name, "/api/stats")
                    memory[name].append(int(stats["memory_cache_size"]))
    cluster.note_pids()
    idle = await cluster.lease_keys()
    await asyncio.sleep(LEASE_S + 1.0)
    later = await cluster.lease_keys()
    return RunData(
        seed=seed,
        chaos_start=start,
        chaos_end=end,
        faults=records,
        ledger=[],
        answers=load.answers,
        evictions=load.evictions,
        jobs=load.jobs,
        job_views=views,
        deliveries=list(cluster.receiver.deliveries),
        memory=memory,
        leases_idle=idle,
        leases_later=later,
        pids={},
        dead={},
        coordinated=coordinated,
    )


async def _until_idle(
    cluster: Cluster, load: Load, http: httpx.AsyncClient, deadline: float
) -> dict[str, dict[str, Any]]:
    """Until nothing is queued or in flight anywhere, every job finished and its callback
    sent (or the deadline); the jobs as last seen."""
    views: dict[str, dict[str, Any]] = {}
    while True:
        busy = []
        for name in cluster.servers:
            for _ in range(3 if name == "W" else 1):
                try:
                    queue = await cluster.get_json(http, name, "/api/queue")
                except httpx.HTTPError as exc:
                    busy.append(f"{name}: {type(exc).__name__}")
                    continue
                if queue["queue_size"] or queue["processing_count"]:
                    busy.append(f"{name}: {queue['processing_count']} in flight")
        for job in load.jobs:
            with contextlib.suppress(httpx.HTTPError):
                views[job.job_id] = await cluster.get_json(http, "A", f"/api/jobs/{job.job_id}")
            view = views.get(job.job_id, {})
            webhook = (view.get("webhook") or {}).get("state")
            if view.get("status") not in ("completed", "failed", "cancelled"):
                busy.append(f"job {job.job_id}: {view.get('status')}")
            elif webhook == "pending":
                busy.append(f"job {job.job_id}: callback pending")
        if not busy or time.monotonic() > deadline:
            return views
        await asyncio.sleep(0.5)


async def _sleep_until(at: float) -> None:
    delay = at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
