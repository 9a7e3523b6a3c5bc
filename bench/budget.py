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
import inspect
import json
import selectors
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.config import Settings
from app.errors import Overloaded
from app.gateway import Gateway
from app.gateway.batching import PRIORITY_REFRESH
from app.jobs.model import Job, new_job_id
from app.jobs.runner import JobRunner
from app.jobs.sqlite import SqliteJobStore
from app.store import SqliteUserStore
from app.upstream import FreelancerClient

API = "https://api.freelancer.test/api/users/0.1/users"
WALL_START = 1_800_000_000.0
JOB_IDS = 10_000_000
"""Ids from here up belong to jobs; refreshes use 20 000 000 up; clients below."""
REFRESH_IDS = 20_000_000


class _JumpingSelector(selectors.DefaultSelector):
    """Polls the real selector; when nothing is ready, moves the loop's clock instead of
    sleeping."""

    loop: VirtualTimeLoop

    def select(self, timeout: float | None = None) -> list[Any]:
        ready: list[Any] = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None or self.loop.busy:  # only real I/O (a store's thread) can wake it
            real: list[Any] = super().select(1.0 if timeout is None else min(timeout, 1.0))
            return real
        self.loop.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock: timers fire in order, at once, whenever the loop
    would otherwise wait. Only for code that waits on nothing but timers and its own tasks
    (no threads, no sockets)."""

    def __init__(self) -> None:
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self
        self.now = 1000.0
        self.busy = 0
        """Store operations running in their threads (the clock does not jump meanwhile)."""

    def time(self) -> float:
        return self.now


class Tracked:
    """A store whose every operation marks the virtual loop busy while it runs in its
    thread: the clock waits for it instead of jumping over it."""

    def __init__(self, inner: Any, loop: VirtualTimeLoop) -> None:
        self._inner = inner
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def tracked(*args: Any, **kwargs: Any) -> Any:
            self._loop.busy += 1
            try:
                return await attr(*args, **kwargs)
            finally:
                self._loop.busy -= 1

        return tracked


@dataclass
class CountingFreelancer:
    """Freelancer's users API as the simulation's upstream: every call's (virtual) time and
    ids, counted where Freelancer would count them."""

    latency_s: float = 0.1
    calls: list[tuple[float, tuple[int, ...]]] = field(default_factory=list)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        ids = tuple(int(v) for k, v in request.url.params.multi_items() if k == "users[]")
        self.calls.append((asyncio.get_running_loop().time(), ids))
        await asyncio.sleep(self.latency_s)
        users = {
            str(i): {"id": i, "username": f"user{i}", "display_name": f"User {i}"} for i in ids
        }
        return httpx.Response(200, json={"status": "success", "result": {"users": users}})

    def times(self, lane: str | None = None) -> list[float]:
        return [at for at, ids in self.calls if lane is None or lane_of(ids[0]) == lane]


def lane_of(user_id: int) -> str:
    if user_id >= REFRESH_IDS:
        return "refreshes"
    return "jobs" if user_id >= JOB_IDS else "misses"


@dataclass
class Simulation:
    gateway: Gateway
    runner: JobRunner
    freelancer: CountingFreelancer
    miss_waits: list[float] = field(default_factory=list)
    shed: int = 0

    @property
    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def submit_job(self, first: int, count: int) -> str:
        """A crawl job of the ids `first` .. `first + count - 1`, as `POST /api/jobs` makes it."""
        now = self.runner.clock()
        job = Job(
            job_id=new_job_id(now),
            status="pending",
            priority="normal",
            total=count,
            materialised=0,
            range_first=first,
            created_at=now,
            updated_at=now,
        )
        await self.runner.store.create(job, [])
        self.runner.wake()
        return job.job_id

    async def crawl(self, first: int, count: int) -> None:
        """A crawl job's ids through the job lane as the job runner hands them over: chunks
        of BATCH_SIZE, UPSTREAM_CONCURRENCY - 1 at once (mongomock's job store is far too
        slow for hours of chunks; the runner's own paths are tested in tests/jobs)."""
        settings = self.gateway.settings
        lane = asyncio.Semaphore(max(1, settings.upstream_concurrency - 1))

        async def chunk(ids: range) -> None:
            try:
                await self.gateway.queue.wait_room(len(ids) + settings.max_users_per_request)
                fetches = self.gateway.enlist(ids, {})
                futures = {f.future for f in fetches.values() if f is not None}
                if futures:
                    await asyncio.wait(futures)
            finally:
                lane.release()

        tasks = set()
        for start in range(first, first + count, settings.batch_size):
            await lane.acquire()
            tasks.add(asyncio.create_task(chunk(range(start, start + settings.batch_size))))
        await asyncio.gather(*tasks)

    async def miss(self, ids: Sequence[int]) -> None:
        """A client's lookup of new ids; its wait is recorded (a 503 "overloaded", when the
        queue is full, is counted instead: a client backs off)."""
        started = self.now
        try:
            await self.gateway.lookup(list(ids))
        except Overloaded:
            self.shed += 1
            return
        self.miss_waits.append(self.now - started)

    def refresh(self, ids: Sequence[int]) -> int:
        wall = self.gateway.clock()
        return sum(self.gateway.schedule_refresh(u, None, PRIORITY_REFRESH, wall) for u in ids)


@asynccontextmanager
async def simulation(folder: Path, **overrides: Any) -> AsyncIterator[Simulation]:
    """The gateway and its job runner on the running `VirtualTimeLoop`'s clock."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualTimeLoop), "run it with asyncio.Runner(loop_factory=...)"
    values: dict[str, Any] = {
        "freelancer_api_base": API,
        "freelancer_oauth_token": "simulation",
        "wait_timeout_s": 7200,
        "queue_max": 100_000,
        "batch_window_ms": 5,
        "sqlite_path": folder / "users.db",
        "store_timeout_s": 600,
    }
    settings = Settings(_env_file=None, **(values | overrides))
    store: Any = Tracked(SqliteUserStore(settings.sqlite_path), loop)
    freelancer = CountingFreelancer()

    def wall() -> float:
        return WALL_START + loop.time()

    async with httpx.AsyncClient(transport=httpx.MockTransport(freelancer.handle)) as http:
        gateway = Gateway(
            settings=settings,
            store=store,
            upstream=FreelancerClient(http, base_url=API, clock=wall),
            clock=wall,
        )
        await gateway.start()
        jobs: Any = Tracked(SqliteJobStore(settings.sqlite_path, timeout_s=600), loop)
        runner = JobRunner(gateway, jobs, clock=wall)
        await runner.start()
        try:
            yield Simulation(gateway, runner, freelancer)
        finally:
            await runner.stop()
            await gateway.stop()


def busiest(times: Sequence[float], period_s: float) -> int:
    """The most of `times` in any span (t - period, t] (two calls exactly a period apart
    are in different spans: differences are compared to a nanosecond, not `t - period`,
    which floats round)."""
    ordered = sorted(times)
    best = start = 0
    for end, at in enumerate(ordered):
        while at - ordered[start] >= period_s - 1e-9:
            start += 1
        best = max(best, end - start + 1)
    return best


async def clients(sim: Simulation, seconds: float, *, every_s: float, size: int) -> None:
    """Bursts of clients' misses: `size` lookups of 100 new ids every `every_s` seconds."""
    next_id = 1
    tasks: set[asyncio.Task[None]] = set()
    end = sim.now + seconds
    while sim.now < end:
        for _ in range(size):
            tasks.add(asyncio.create_task(sim.miss(range(next_id, next_id + 100))))
            next_id += 100
        await asyncio.sleep(every_s)
    await asyncio.gather(*tasks)


async def refreshes(sim: Simulation, seconds: float, *, per_minute: int) -> None:
    next_id = REFRESH_IDS
    end = sim.now + seconds
    while sim.now < end:
        sim.refresh(range(next_id, next_id + per_minute))
        next_id += per_minute
        await asyncio.sleep(60)


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
