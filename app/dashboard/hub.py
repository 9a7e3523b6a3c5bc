"""One sample of the gateway a second, computed once and handed to every open dashboard stream.

The hub belongs to the lifespan (made when the gateway starts, closed when it stops or the
process is asked to exit); its sampler task runs only while at least one stream is open.
Streams wait on `next_frame`. A sample is encoded once, by the `encode` the HTTP edge
gives (Server-Sent Events), for every stream. Crawl jobs are read from the job store at
most once a tick, never two reads at once, so a slow store never holds a stream up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from app.dashboard.sampler import JobsNow, RateSampler
from app.errors import StoreUnavailable
from app.gateway import Gateway
from app.jobs.model import Job
from app.jobs.runner import JobRunner

log = logging.getLogger("app.dashboard")

TICK_S = 1.0
"""Seconds between samples (tests shorten it)."""
STORE_COUNT_S = 5.0
"""Seconds between two counts of the store's users (a count may scan a large table)."""
ACTIVE_JOBS_SHOWN = 10
"""Active jobs a sample lists (running first, then by priority and age)."""

EncodeEvent = Callable[[str, str | None, str], bytes]
"""(event name, event id, data) -> the bytes of one event on the wire."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One sample, encoded as an SSE event once for every stream."""

    seq: int
    event: bytes


class DashboardHub:
    """Samples the gateway once a second while at least one stream is open.

    Streams wait on `next_frame`; the sampler task is started by the first `attach` and
    returns once the last `detach` wakes it, so nothing runs while no dashboard is open.
    """

    def __init__(
        self,
        gateway: Gateway,
        runner: JobRunner | None,
        *,
        key_usage: Callable[[], Iterable[Mapping[str, Any]]] | None,
        encode: EncodeEvent,
    ) -> None:
        self.gateway = gateway
        self.runner = runner
        self.key_usage = key_usage
        self.encode = encode
        self.loop = asyncio.get_running_loop()
        self.sampler = RateSampler()
        self.samples_taken = 0
        self.closing = False
        self._streams = 0
        self._latest: Frame | None = None
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._count_task: asyncio.Task[None] | None = None
        self._store_size: int | None = None
        self._store_counted_at = float("-inf")
        self._jobs_task: asyncio.Task[None] | None = None
        self._jobs_read: tuple[JobRunner, list[Job]] | None = None
        self._closed = False

    @property
    def streams(self) -> int:
        """Streams open now."""
        return self._streams

    @property
    def running(self) -> bool:
        """Whether the sampler task exists and has not finished."""
        return self._task is not None and not self._task.done()

    def attach(self) -> None:
        """A stream opened: start sampling if it is the first."""
        self._streams += 1
        self.closing = self._closed
        if not self.running and not self._closed:
            self._task = asyncio.create_task(self._run(), name="dashboard-sampler")

    def detach(self) -> None:
        """A stream closed (synchronous: it runs while the stream is being cancelled).

        The last one wakes the sampler, which then sees no stream and returns: it is never
        cancelled, so a stream attaching meanwhile finds it still running, and no await
        separates its last look at the streams from its end.
        """
        self._streams -= 1
        if self._streams <= 0:
            self._wake.set()

    async def aclose(self) -> None:
        """Close, and wait for the hub's own tasks to end (the lifespan's last word to it)."""
        self.close()
        tasks = [t for t in (self._task, self._count_task, self._jobs_task) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    def history(self) -> str:
        """The `history` event's data: the chart points kept."""
        points = list(self.sampler.points)
        return orjson.dumps({"interval_s": TICK_S, "points": points}).decode()

    async def next_frame(self, after: int) -> Frame | None:
        """The newest frame later than `after`, waiting for one; None once closing."""
        while not self.closing:
            latest = self._latest
            if latest is not None and latest.seq > after:
                return latest
            await self._changed.wait()
        return None

    def close(self) -> None:
        """End every stream: the gateway stops, or the process was asked to exit.

        Synchronous, so a signal handler can call it (through the loop): a server waits
        for open responses before it runs the lifespan's shutdown, so the streams must
        end on the signal itself, not when the gateway stops.
        """
        self._closed = self.closing = True
        self._publish()
        self._wake.set()

    def _publish(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _run(self) -> None:
        next_at = self.loop.time()
        failing = False
        while self._streams > 0 and not self._closed:
            delay = next_at - self.loop.time()
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                continue
            try:
                self._tick(self.gateway)
                failing = False
            except Exception:  # a bug here must not stop every open dashboard
                if not failing:  # once, not once a second
                    log.exception("the dashboard's sample failed")
                failing = True
            next_at = max(next_at + TICK_S, self.loop.time())

    def _tick(self, gateway: Gateway) -> None:
        """Take one sample and hand it to every stream."""
        self._count_store(gateway)
        sample = self.sampler.sample(
            gateway,
            store_size=self._store_size,
            key_usage=self._key_usage(),
            jobs=self._jobs_now(),
        )
        self.samples_taken += 1
        seq = sample["seq"]
        data = orjson.dumps(sample).decode()
        self._latest = Frame(seq, self.encode("sample", str(seq), data))
        self._publish()

    def _count_store(self, gateway: Gateway) -> None:
        """Start a count of the store's users, at most every STORE_COUNT_S, never two at once."""
        now = self.loop.time()
        if now - self._store_counted_at < STORE_COUNT_S:
            return
        if self._count_task is not None and not self._count_task.done():
            return
        self._store_counted_at = now
        self._count_task = asyncio.create_task(self._count(gateway), name="dashboard-count")

    async def _count(self, gateway: Gateway) -> None:
        try:
            self._store_size = await gateway.store.count()
        except StoreUnavailable:
            self._store_size = None
        except Exception:  # a store closing under us at shutdown: no number, no noise
            log.debug("counting the store's users failed", exc_info=True)
            self._store_size = None

    def _jobs_now(self) -> JobsNow | None:
        """The runner's counters, and the active jobs of the latest store read (one read
        is started per tick at most, never two at once, so a slow store never holds the
        stream up); None when no runner exists."""
        runner = self.runner
        if runner is None:
            return None
        if self._jobs_task is None or self._jobs_task.done():
            self._jobs_task = asyncio.create_task(self._read_jobs(runner), name="dashboard-jobs")
        read = self._jobs_read
        if read is None or read[0] is not runner:  # not read yet: unknown, not "none"
            return JobsNow(by_status=runner.by_status, ids_done=runner.ids_done, active=None)
        jobs = sorted(read[1], key=lambda job: (job.status != "running", job.rank, job.job_id))
        active = []
        for job in jobs[:ACTIVE_JOBS_SHOWN]:
            waiting = runner.waiting_for(job)
            active.append(
                {
                    "job_id": job.job_id,
                    "label": job.label,
                    "status": job.status,
                    "done": job.done,
                    "total": job.total,
                    "eta_s": runner.eta_s(job),
                    "waiting_for": waiting[0] if waiting else None,
                    "waiting_in_s": waiting[1] if waiting else None,
                }
            )
        return JobsNow(runner.by_status, runner.ids_done, active, active_total=len(jobs))

    async def _read_jobs(self, runner: JobRunner) -> None:
        try:
            jobs = await runner.store.active()
        except StoreUnavailable:
            jobs = []
        except Exception:  # a store closing under us at shutdown: no jobs, no noise
            log.debug("reading the active jobs failed", exc_info=True)
            jobs = []
        self._jobs_read = (runner, jobs)

    def _key_usage(self) -> list[Mapping[str, Any]]:
        usage = self.key_usage
        if usage is None:
            return []
        try:
            return list(usage())
        except Exception:
            log.warning("key usage could not be read for the dashboard", exc_info=True)
            return []
