"""`python -m bench.budget`: the budget's lanes over simulated hours, in seconds.

The real gateway (planner, budget, worker, job runner) runs on a `VirtualTimeLoop`, an
event loop whose clock jumps to the next timer whenever nothing is ready, against a fake
Freelancer that counts calls at its door (virtual time) and SQLite stores in a temporary
folder, each operation counted as "busy" so the clock never jumps while one runs in its
thread. Workloads, at the default budget (50 a minute,
1 000 an hour, reserves 10 and 200, burst 10): clients' misses alone, in bursts to the
minute limit; a crawl job alone, paced to the hour; refreshes alone; all three at once.
Reports the busiest minute and hour against the limits, each lane's share of the calls,
and the client-miss latency (the wait for budget); exits 1 when a limit is exceeded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support.simulation import (
    JOB_IDS,
    VirtualTimeLoop,
    busiest,
    clients,
    lane_of,
    refreshes,
    simulation,
)


async def workload(name: str, hours: float, folder: Path) -> dict[str, Any]:
    """One workload over `hours` simulated hours; its figures."""
    seconds = hours * 3600
    async with simulation(folder) as sim:
        began = sim.now
        tasks = []
        if name in ("misses", "all"):
            # 40 lookups of 100 new ids every 30 s: 80 calls a minute wanted, 50 given.
            tasks.append(clients(sim, seconds, every_s=30, size=40))
        if name in ("jobs", "all"):
            await sim.submit_job(JOB_IDS, 2_000_000)
        if name in ("refreshes", "all"):
            tasks.append(refreshes(sim, seconds, per_minute=3_000))
        timer = asyncio.sleep(seconds)
        await asyncio.gather(timer, *tasks)

        calls = [(at - began, ids) for at, ids in sim.freelancer.calls if at - began <= seconds]
        times = [at for at, _ in calls]
        by_lane = {lane: 0 for lane in ("misses", "jobs", "refreshes")}
        for _, ids in calls:
            by_lane[lane_of(ids[0])] += 1
        hour = busiest(times, 3600.0)
        minute = busiest(times, 60.0)
        first_hour = [t for t in times if t <= 3600]
        waits = sorted(sim.miss_waits)
        return {
            "workload": name,
            "hours": hours,
            "calls": len(times),
            "busiest_minute": minute,
            "busiest_hour": hour,
            "calls_first_hour": len(first_hour),
            "lanes": {lane: round(n / max(1, len(times)), 3) for lane, n in by_lane.items()},
            "lane_calls": by_lane,
            "miss_wait_p50_s": round(statistics.median(waits), 2) if waits else None,
            "miss_wait_p99_s": round(waits[int(len(waits) * 0.99) - 1], 2) if waits else None,
            "shed_lookups": sim.shed,
            "within_limits": minute <= 50 and hour <= 1000,
        }


def run(name: str, hours: float) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory() as folder,
        asyncio.Runner(loop_factory=VirtualTimeLoop) as runner,
    ):
        return runner.run(workload(name, hours, Path(folder)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=1.0)
    args = parser.parse_args(argv)
    results = [run(name, args.hours) for name in ("misses", "jobs", "refreshes", "all")]
    print(
        f"{'workload':<10} {'calls':>6} {'max/min':>8} {'max/hour':>9} "
        f"{'misses':>7} {'jobs':>6} {'refresh':>8} {'miss wait p50/p99':>18}"
    )
    for r in results:
        lanes = r["lanes"]
        wait = (
            f"{r['miss_wait_p50_s']} / {r['miss_wait_p99_s']} s"
            if r["miss_wait_p50_s"] is not None
            else "-"
        )
        print(
            f"{r['workload']:<10} {r['calls']:>6} {r['busiest_minute']:>5}/50 "
            f"{r['busiest_hour']:>5}/1000 {lanes['misses']:>7.0%} {lanes['jobs']:>6.0%} "
            f"{lanes['refreshes']:>8.0%} {wait:>18}"
        )
    print(json.dumps(results, indent=1), file=sys.stderr)
    return 0 if all(r["within_limits"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
