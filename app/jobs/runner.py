"""The job runner: advances every active job a chunk at a time through the gateway's job lane.

One runner per deployment works (the process that holds the coordinator's lead). Each
round it takes the active jobs of the highest priority present and hands each of them one
chunk (round robin), at most UPSTREAM_CONCURRENCY - 1 chunks at once, so a waiting
client always finds a fetch slot free. A chunk is answered from memory and the store
where fresh enough (`max_age_s`), and the rest joins the gateway's single-flight path in
the job lane (`Gateway.enlist`), where the gateway's planner spends the budget for it:
paced to the hour, leaving each window's reserve to clients, and first in line while jobs
have less than JOB_SHARE of the calls (`app.gateway.planner`). A job's `eta_s` comes from
the same numbers. Results are written to the store chunk by chunk: after a crash, a job
resumes at its first pending id, and what was saved is not fetched again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.clock import Clock
from app.domain import UserRecord
from app.errors import StoreUnavailable
from app.gateway import Gateway
from app.gateway.batching import loop_clock
from app.gateway.budget import JOBS
from app.gateway.cache import fetched_at, record_of
from app.gateway.flight import cancel_all
from app.gateway.results import NOT_FOUND, Failure
from app.jobs.model import ACTIVE, FAILED, FOUND, Item, Job
from app.jobs.model import NOT_FOUND as ITEM_NOT_FOUND
from app.jobs.store import JobStore
from app.jobs.webhook import Webhooks

log = logging.getLogger("app.jobs")

POLL_S = 1.0
"""How often an idle runner looks for new jobs (a submission wakes it at once)."""
MATERIALISE_CHUNK = 10_000
"""Ids of a range written as items at a time."""
STATUS_EVERY_S = 5.0
PAUSE_S = 1.0
"""How long a job waits when a chunk could start nothing (breaker open, ids failing)."""


@dataclass(slots=True)
class Progress:
    """What the runner knows of one job between rounds (lost on restart, by design)."""

    cursor: int = -1
    """The last `seq` handed to a chunk: the next chunk reads after it."""
    chunks: int = 0
    not_before: float = 0.0
    attempts: dict[int, int] = field(default_factory=dict)
    done: int = 0
    """Ids this process recorded done for the job (speed needs differences only)."""
    rate: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=30))
    """(monotonic time, `done`) samples: the job's recent speed."""

    def ids_per_s(self) -> float | None:
        if len(self.rate) < 2 or self.rate[-1][0] <= self.rate[0][0]:
            return None
        (t0, n0), (t1, n1) = self.rate[0], self.rate[-1]
        return (n1 - n0) / (t1 - t0)


class JobRunner:
    """Runs jobs in the background of one gateway process."""

    def __init__(self, gateway: Gateway, store: JobStore, *, clock: Clock) -> None:
        self.gateway = gateway
        self.store = store
        self.clock = clock
        settings = gateway.settings
        self.settings = settings
        self.webhooks = Webhooks(store, settings, clock=clock, coordinator=gateway.coordinator)
        self.progress: dict[str, Progress] = {}
        self.by_status: dict[str, int] = {}
        self.ids_done = 0
        self.upstream_calls = 0
        self._lane = asyncio.Semaphore(max(1, settings.upstream_concurrency - 1))
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._chunks: set[asyncio.Task[None]] = set()
        self._status_at = 0.0

    async def start(self) -> None:
        """Open the job store (retrying in the background while it fails), start the loops."""
        with contextlib.suppress(StoreUnavailable):
            await self.store.open()
        self._spawn(self._run(), "job-runner")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Stop taking chunks; chunks in flight are abandoned (their ids stay pending)."""
        await cancel_all(self._tasks | self._chunks)
        await self.webhooks.close()
        await self.store.close()

    def wake(self) -> None:
        """A job was submitted or changed: look now, not at the next poll."""
        self._wake.set()

    def eta_s(self, job: Job) -> float | None:
        """Seconds until the job is done: its calls at the job lane's pace from the windows
        as they stand (the planner's numbers), or its recent speed, whichever is slower."""
        if job.status not in ACTIVE:
            return None
        left = job.total - job.done
        calls = math.ceil(left / self.settings.batch_size)
        budget_s = self.gateway.planner.job_eta_s(calls)
        progress = self.progress.get(job.job_id)
        speed = progress.ids_per_s() if progress else None
        return round(max(budget_s, left / speed if speed else 0.0), 1)

    async def _run(self) -> None:
        while True:
            try:
                await self.store.open()
                break
            except StoreUnavailable as exc:
                log.warning("jobs wait for the store: %s", exc)
                await asyncio.sleep(POLL_S * 5)
        self._spawn(self.webhooks.run(), "job-webhooks")
        self._spawn(self._keep_counting(), "job-counts")
        while True:
            moved = False
            try:
                await self._count_statuses()
                if self.gateway.coordinator.leads():
                    await self.store.sweep()  # finish what a crash or a timeout cut short
                    moved = await self._round()
            except StoreUnavailable as exc:
                log.warning("jobs paused: %s", exc)
            except Exception:
                log.exception("job runner round failed; retrying")
            if not moved:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_S):
                        await self._wake.wait()

    async def _keep_counting(self) -> None:
        """Count jobs by status even while a round waits (its chunks for the budget, which
        can take an hour): the counts `/api/stats` and the dashboard show must not freeze."""
        while True:
            await asyncio.sleep(max(STATUS_EVERY_S, POLL_S))
            with contextlib.suppress(StoreUnavailable):
                await self._count_statuses()

    def waiting_for(self, job: Job) -> tuple[str, float | None] | None:
        """What an active job waits for, and for how long when that is known: its chunks in
        line for the budget (why the planner holds the job lane: "minute", "hour", "pace",
        "pause", "behind misses"), or "other jobs" (no chunk of its in line: the job lane's
        slots hold other jobs' chunks). None: not waiting (a chunk of it is being fetched)."""
        if job.status not in ACTIVE:
            return None
        progress = self.progress.get(job.job_id)
        if progress is None or not progress.chunks:
            return "other jobs", None
        held = next((w for w in self.gateway.planner.waiting() if w.lane == JOBS), None)
        return None if held is None else (held.waits_for, held.in_s)

    async def _count_statuses(self) -> None:
        now = loop_clock()
        if now - self._status_at >= STATUS_EVERY_S:
            self.by_status = await self.store.count_by_status()
            self._status_at = now

    async def _round(self) -> bool:
        """One chunk for each ready job of the highest priority present; True if any."""
        jobs = await self.store.active()
        for gone in set(self.progress) - {j.job_id for j in jobs}:
            if not self.progress[gone].chunks:
                del self.progress[gone]
        now = loop_clock()
        ready = [j for j in jobs if self._progress(j).not_before <= now]
        if not ready:
            return False
        rank = min(j.rank for j in ready)
        moved = False
        for job in (j for j in ready if j.rank == rank):
            if job.status == "pending":
                changes = {"status": "running", "started_at": job.started_at or self.clock()}
                await self.store.update(job.job_id, changes, only_if=("pending",))
            await self._lane.acquire()
            try:
                # Read again after the wait for a slot: a cancel or a delete meanwhile
                # must not let one more chunk go (nor materialise ids for a gone job).
                if await self.store.status(job.job_id) not in ACTIVE:
                    self._lane.release()
                    self.progress.pop(job.job_id, None)
                    continue
                items = await self._next_chunk(job)
            except BaseException:
                self._lane.release()
                raise
            if not items:
                self._lane.release()
                continue
            progress = self._progress(job)
            progress.cursor = items[-1].seq
            progress.chunks += 1
            task = asyncio.create_task(self._chunk(job, items), name="job-chunk")
            self._chunks.add(task)
            task.add_done_callback(self._chunks.discard)
            moved = True
        return moved

    def _progress(self, job: Job) -> Progress:
        return self.progress.setdefault(job.job_id, Progress())

    async def _next_chunk(self, job: Job) -> list[Item]:
        """The next pending items after the cursor, materialising a range as needed; when
        there are none, finish the job (or go round again for ids left pending)."""
        progress = self._progress(job)
        size = self.settings.batch_size
        items = await self.store.pending_items(job.job_id, after=progress.cursor, limit=size)
        if not items and job.range_first is not None and job.materialised < job.total:
            count = min(MATERIALISE_CHUNK, job.total - job.materialised)
            first = job.range_first + job.materialised
            await self.store.materialise(job.job_id, job.materialised, range(first, first + count))
            items = await self.store.pending_items(job.job_id, after=progress.cursor, limit=size)
        if items or progress.chunks:
            return items
        if progress.cursor >= 0:  # ids left pending behind the cursor: go round again
            progress.cursor = -1
            return await self.store.pending_items(job.job_id, after=-1, limit=size)
        await self._finish(job, "completed")
        return []

    async def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        now = self.clock()
        changes: dict[str, object] = {"status": status, "finished_at": now, "updated_at": now}
        if error is not None:
            changes["error"] = error
        if job.callback_url:
            changes |= {"webhook": "pending", "webhook_next_at": now, "webhook_attempts": 0}
        if status == "completed":
            # Only once every id is written and counted; else look again a moment later.
            ended = await self.store.complete(job.job_id, changes)
            if not ended:
                self._progress(job).not_before = loop_clock() + PAUSE_S
        else:
            ended = await self.store.update(job.job_id, changes, only_if=ACTIVE)
        if ended:
            log.info("job %s %s: %s", job.job_id, status, error or "every id done")
            self.progress.pop(job.job_id, None)
            self.webhooks.wake()

    async def _chunk(self, job: Job, items: list[Item]) -> None:
        progress = self._progress(job)
        try:
            done, calls, error = await self._resolve(job, items, progress)
            if done or calls:
                await self.store.record(job.job_id, done, upstream_calls=calls, now=self.clock())
            self.ids_done += len(done)
            self.upstream_calls += calls
            if error is not None:
                await self._finish(job, "failed", error)
            elif len(done) < len(items) and not calls:
                progress.not_before = loop_clock() + PAUSE_S
            progress.done += len(done)
            progress.rate.append((loop_clock(), progress.done))
        except StoreUnavailable as exc:
            log.warning("job %s: chunk not recorded, it will be redone: %s", job.job_id, exc)
            progress.cursor = min(progress.cursor, items[0].seq - 1)
            progress.not_before = loop_clock() + PAUSE_S
        finally:
            progress.chunks -= 1
            self._lane.release()
            self._wake.set()

    async def _resolve(
        self, job: Job, items: Sequence[Item], progress: Progress
    ) -> tuple[list[Item], int, str | None]:
        """Each item's new state (items left out stay pending), the upstream calls spent,
        and why the job cannot go on, if it cannot."""
        done, calls, error, records = await self._outcomes(job, items, progress)
        # The users are saved before their items say `found`, so a crash in between can
        # only leave an id pending (fetched again, or found fresh in the store), never
        # marked found with nothing to show: fetched users, and users memory holds that a
        # save has not written yet. Upserts never replace a newer copy.
        if records:
            await self.gateway.store.upsert_many(records)
        for item in done:
            progress.attempts.pop(item.seq, None)
        return done, calls, error

    async def _outcomes(
        self, job: Job, items: Sequence[Item], progress: Progress
    ) -> tuple[list[Item], int, str | None, list[UserRecord]]:
        """`_resolve`'s states, calls and error, and the users to save before recording."""
        gateway = self.gateway
        now = self.clock()
        fresh_after = now - job.max_age_s
        done: list[Item] = []
        need: dict[int, Item] = {}
        records: list[UserRecord] = []
        for item in items:
            entry = gateway.memory.users.get(item.user_id)
            if entry is not None and fetched_at(entry) >= fresh_after:
                done.append(Item(item.seq, item.user_id, FOUND))
                if gateway.writes.held(item.user_id) is not None:  # saved before `found`
                    records.append(record_of(entry))
            elif gateway.memory.not_found.get(item.user_id, now) is not None:
                done.append(Item(item.seq, item.user_id, ITEM_NOT_FOUND))
            else:
                need[item.user_id] = item
        if not need:
            return done, 0, None, records
        stored = await gateway.writes.read(list(need))
        for uid, record in stored.items():
            if record.fetched_at >= fresh_after:
                done.append(Item(need.pop(uid).seq, uid, FOUND))
        if not need:
            return done, 0, None, records
        if await self.store.status(job.job_id) not in ACTIVE:  # cancelled while it waited
            return done, 0, None, records
        fetches = gateway.enlist(list(need), stored)
        futures = {f.future for f in fetches.values() if f is not None}
        if futures:
            bound = self.settings.upstream_timeout_s * self.settings.upstream_max_attempts
            await asyncio.wait(futures, timeout=bound + 60)
        calls = len({f.taken for f in fetches.values() if f is not None and f.taken})
        error = None
        for uid, fetch in fetches.items():
            item = need[uid]
            if fetch is None or not fetch.future.done():
                continue
            outcome = fetch.future.result()
            if not isinstance(outcome, Failure):
                records.append(record_of(outcome))
                done.append(Item(item.seq, uid, FOUND))
            elif outcome.reason == NOT_FOUND.reason:
                done.append(Item(item.seq, uid, ITEM_NOT_FOUND))
            elif outcome.reason == "auth":
                error = f"Freelancer refused the credentials: {outcome.detail}"
            elif outcome.reason != "shutdown":
                tries = progress.attempts[item.seq] = progress.attempts.get(item.seq, 0) + 1
                if tries >= self.settings.job_max_attempts:
                    done.append(Item(item.seq, uid, FAILED, outcome.reason))
        return done, calls, error, records
