"""The real gateway and job runner over simulated hours: a virtual-time event loop.

`VirtualTimeLoop` is an event loop whose clock jumps to the next timer whenever nothing is
ready (and never while a store operation runs in its thread: `Tracked`). `simulation()`
runs the gateway, its planner and budget, and the job runner on it, against
`CountingFreelancer`, a fake Freelancer that logs each call's (virtual) receipt time and
ids where Freelancer would count them, and SQLite stores in a folder. The budget tests
(tests/jobs/test_job_lane.py, tests/gateway/test_budget_red_team.py) and
`python -m bench.budget` share it.
"""

from __future__ import annotations

import asyncio
import inspect
import selectors
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from unittest.mock import patch

import httpx

from app.config import Settings
from app.errors import Overloaded
from app.gateway import Gateway
from app.gateway.batching import PRIORITY_REFRESH
from app.gateway.budget import Ask, Budget, Grant, LocalBudget, budget_windows
from app.gateway.coordinator import Coordinator
from app.jobs import runner as job_runner
from app.jobs import webhook as job_webhook
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
IDLE_POLL_S = 1.0
"""The product's idle poll of the job runner and of job callbacks."""


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
    ids, counted where Freelancer would count them: `trip_s()` seconds after the gateway
    sent it (0 unless set)."""

    latency_s: float = 0.1
    trip_s: Callable[[], float] | None = None
    calls: list[tuple[float, tuple[int, ...]]] = field(default_factory=list)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        ids = tuple(int(v) for k, v in request.url.params.multi_items() if k == "users[]")
        if self.trip_s is not None:
            await asyncio.sleep(self.trip_s())
        self.calls.append((asyncio.get_running_loop().time(), ids))
        await asyncio.sleep(self.latency_s)
        users = {
            str(i): {"id": i, "username": f"user{i}", "display_name": f"User {i}"} for i in ids
        }
        return httpx.Response(200, json={"status": "success", "result": {"users": users}})

    def times(self, lane: str | None = None) -> list[float]:
        """Receipt times of the calls (of one lane, by their first id)."""
        return [at for at, ids in self.calls if lane is None or lane_of(ids[0]) == lane]

    def lanes(self) -> list[tuple[float, str]]:
        """Each call's receipt time and lane (by its first id)."""
        return [(at, lane_of(ids[0])) for at, ids in self.calls]


def lane_of(user_id: int) -> str:
    if user_id >= REFRESH_IDS:
        return "refreshes"
    return "jobs" if user_id >= JOB_IDS else "misses"


class RecordingBudget:
    """The gateway's `LocalBudget`, remembering the lane of every call it granted and was
    not given back: which lane each call was spent for (a batch may carry other lanes'
    ids besides its own, so the ids at Freelancer's door do not tell)."""

    def __init__(self, inner: LocalBudget) -> None:
        self.inner = inner
        self.granted: dict[str, tuple[float, str]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def try_spend(self, asks: Sequence[Ask]) -> Grant:
        grant = await self.inner.try_spend(asks)
        if grant.ticket is not None and grant.lane is not None:
            self.granted[grant.ticket] = (asyncio.get_running_loop().time(), grant.lane)
        return grant

    async def refund(self, ticket: str) -> None:
        self.granted.pop(ticket, None)
        await self.inner.refund(ticket)

    def spent(self) -> list[tuple[float, str]]:
        """(time granted, lane) of every call spent, in time order."""
        return sorted(self.granted.values())


@dataclass
class Simulation:
    gateway: Gateway
    runner: JobRunner
    freelancer: CountingFreelancer
    budget: RecordingBudget
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
async def simulation(
    folder: Path,
    *,
    freelancer: CountingFreelancer | None = None,
    coordinator: Coordinator | None = None,
    **overrides: Any,
) -> AsyncIterator[Simulation]:
    """The gateway and its job runner on the running `VirtualTimeLoop`'s clock, calling
    `freelancer` (a new `CountingFreelancer` by default), settings overridden by name. The job
    runner's and the callbacks' idle polls are the product's (`IDLE_POLL_S`), not the
    in-process tests' 50 ms: simulated hours of 50 ms polls are hours of real store reads."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualTimeLoop), "run it with asyncio.Runner(loop_factory=...)"
    with (
        patch.object(job_runner, "POLL_S", IDLE_POLL_S),
        patch.object(job_webhook, "POLL_S", IDLE_POLL_S),
    ):
        async with _simulation(loop, folder, freelancer, coordinator, overrides) as sim:
            yield sim


@asynccontextmanager
async def _simulation(
    loop: VirtualTimeLoop,
    folder: Path,
    freelancer: CountingFreelancer | None,
    coordinator: Coordinator | None,
    overrides: dict[str, Any],
) -> AsyncIterator[Simulation]:
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
    freelancer = freelancer or CountingFreelancer()

    def wall() -> float:
        return WALL_START + loop.time()

    budget = RecordingBudget(LocalBudget(budget_windows(settings), clock=loop.time))
    async with httpx.AsyncClient(transport=httpx.MockTransport(freelancer.handle)) as http:
        gateway = Gateway(
            budget=cast(Budget, budget),
            settings=settings,
            store=store,
            upstream=FreelancerClient(http, base_url=API, clock=wall),
            coordinator=coordinator,
            clock=wall,
        )
        await gateway.start()
        jobs: Any = Tracked(SqliteJobStore(settings.sqlite_path, timeout_s=600), loop)
        runner = JobRunner(gateway, jobs, clock=wall)
        await runner.start()
        try:
            yield Simulation(gateway, runner, freelancer, budget)
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


async def clients(
    sim: Simulation, seconds: float, *, every_s: float, size: int, ids: int = 100
) -> None:
    """Bursts of clients' misses: `size` lookups of `ids` new ids every `every_s` seconds,
    for `seconds` (then it waits for their answers)."""
    next_id = 1
    tasks: set[asyncio.Task[None]] = set()
    end = sim.now + seconds
    while sim.now < end:
        for _ in range(size):
            tasks.add(asyncio.create_task(sim.miss(range(next_id, next_id + ids))))
            next_id += ids
        await asyncio.sleep(every_s)
    await asyncio.gather(*tasks)


async def refreshes(sim: Simulation, seconds: float, *, per_minute: int) -> None:
    next_id = REFRESH_IDS
    end = sim.now + seconds
    while sim.now < end:
        sim.refresh(range(next_id, next_id + per_minute))
        next_id += per_minute
        await asyncio.sleep(60)


def simulate(
    folder: Path, scenario: Callable[[Simulation], Awaitable[None]], **settings: Any
) -> Simulation:
    """Run `scenario` on the real gateway and job runner over simulated time (a fresh
    `VirtualTimeLoop`); the simulation, for its counts."""
    result: list[Simulation] = []

    async def main() -> None:
        async with simulation(folder, **settings) as sim:
            await scenario(sim)
            result.append(sim)

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        runner.run(main())
    return result[0]
