"""A crash or a store timeout between any two writes of a job-store operation leaves every
job right: once the process restarts (or the same one goes on) and the client retries
what failed, a job's counters agree with its ids, its progress never passes 1, and no job
completes with ids still pending or missing.

Each scenario runs once per write point of its operation and per way of failing
(`tests/store/faults.py`), on SQLite, mongomock and (with TEST_MONGODB_URL) MongoDB.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from app.errors import JobConflict, StoreUnavailable
from app.jobs.model import ACTIVE, FAILED, FINISHED, FOUND, NOT_FOUND, PENDING, Item, Job
from app.jobs.mongo import MongoJobStore
from app.jobs.sqlite import SqliteJobStore
from app.jobs.store import JobStore
from tests.store.conftest import JobStores
from tests.support.store_faults import Crash, Fault, Faults, inject

NOW = 1_700_000_000.0
IDS = [101, 102, 103, 104, 105, 106]
MAX_WRITES = 60
"""No operation here has more writes; a loop past it is a bug in the test."""


def make_job(job_id: str, *, total: int, **fields: object) -> Job:
    job = Job(job_id=job_id, status="pending", priority="normal", total=total, materialised=total)
    for name, value in {"created_at": NOW, "updated_at": NOW, **fields}.items():
        setattr(job, name, value)
    return job


async def item_states(store: JobStore) -> dict[str, list[int]]:
    """Every stored item's state by job id, read from the database itself (hidden or
    orphaned items included)."""
    rows: list[tuple[str, int]]
    if isinstance(store, SqliteJobStore):
        assert store._db is not None
        found = await store._db.execute_fetchall("SELECT job_id, state FROM job_items")
        rows = [(job_id, state) for job_id, state in found]
    else:
        assert isinstance(store, MongoJobStore)
        docs = await store._items.find({}, {"_id": 0, "job_id": 1, "state": 1}).to_list(None)
        rows = [(d["job_id"], d["state"]) for d in docs]
    states: dict[str, list[int]] = {}
    for job_id, state in rows:
        states.setdefault(job_id, []).append(state)
    return states


async def visible_jobs(store: JobStore) -> list[Job]:
    return await store.list_jobs(status=None, limit=1000, before=None)


async def assert_whole(store: JobStore) -> None:
    """Every job a reader can see has all its materialised ids (none half-written or
    half-deleted)."""
    states = await item_states(store)
    for job in await visible_jobs(store):
        stored = len(states.get(job.job_id, []))
        assert stored >= job.materialised, f"{job.job_id} shows {stored} of its ids: {job}"


async def assert_consistent(store: JobStore, *, orphans_allowed: bool = False) -> None:
    """Counters agree with the items, progress is at most 1, a completed job has every id
    done, and no item is left without its job."""
    states = await item_states(store)
    for job in await visible_jobs(store):
        count = Counter(states.pop(job.job_id, []))
        assert (job.found, job.not_found, job.failed) == (
            count[FOUND],
            count[NOT_FOUND],
            count[FAILED],
        ), f"counters disagree with the ids: {job} vs {dict(count)}"
        assert job.done == job.found + job.not_found + job.failed, job
        assert job.done <= job.total, f"progress past 1: {job}"
        assert sum(count.values()) <= job.total, f"more ids than the job has: {job}"
        if job.status == "completed":
            assert count[PENDING] == 0, f"completed with ids pending: {job}"
            assert job.done == job.total, f"completed with ids missing: {job}"
    if not orphans_allowed:
        assert not states, f"ids of no job left behind: {sorted(states)}"


async def assert_safe(store: JobStore) -> None:
    """What holds even while a cut-short operation is not settled yet: every job whole,
    no progress past 1, no job completed with ids pending or not done."""
    await assert_whole(store)
    states = await item_states(store)
    for job in await visible_jobs(store):
        assert job.done <= job.total, f"progress past 1: {job}"
        if job.status == "completed":
            assert PENDING not in states.get(job.job_id, []), f"completed, ids pending: {job}"
            assert job.done == job.total, f"completed with ids missing: {job}"


async def run_jobs(store: JobStore, *, settled: bool) -> None:
    """What the runner does, two ids at a time, every id found, until no job is active or
    a round moves nothing; the jobs are checked after every step (in full once what was
    cut short is `settled`)."""
    for _ in range(100):
        moved = False
        jobs = await store.active()
        for job in jobs:
            items = await store.pending_items(job.job_id, after=-1, limit=2)
            if items:
                done = [Item(i.seq, i.user_id, FOUND) for i in items]
                await store.record(job.job_id, done, upstream_calls=1, now=NOW)
                moved = True
            elif job.range_first is not None and job.materialised < job.total:
                first = job.range_first + job.materialised
                count = min(4, job.total - job.materialised)
                await store.materialise(job.job_id, job.materialised, range(first, first + count))
                moved = True
            else:
                changes = {"status": "completed", "finished_at": NOW, "updated_at": NOW}
                moved |= await store.complete(job.job_id, changes)
            if settled:
                await assert_consistent(store, orphans_allowed=True)
            else:
                await assert_safe(store)
        if not moved:
            assert not (settled and jobs), f"jobs stuck: {jobs}"
            return
    raise AssertionError("the jobs did not finish in 100 rounds")


async def recover(stores: JobStores, store: JobStore) -> None:
    """What a restarted (or still running) process does at its next rounds, once what was
    cut short is old enough to be surely abandoned."""
    stores.advance(3600)
    await store.sweep()


@dataclass(frozen=True)
class Scenario:
    """A job in some state, one operation on it, and what its client does after a failure."""

    setup: Callable[[JobStore], Awaitable[None]]
    operation: Callable[[JobStore], Awaitable[object]]
    retry: Callable[[JobStore], Awaitable[object]]


async def nothing(store: JobStore) -> None:
    """No setup."""


async def create(store: JobStore) -> None:
    await store.create(make_job("c1", total=len(IDS)), IDS)


async def submit_again(store: JobStore) -> None:
    """The client got an error: it submits the same ids again (a new job)."""
    await store.create(make_job("c2", total=len(IDS)), IDS)


async def six_pending(store: JobStore) -> None:
    await store.create(make_job("r1", total=len(IDS)), IDS)


MIXED = [
    Item(0, 101, FOUND),
    Item(1, 102, FOUND),
    Item(2, 103, NOT_FOUND),
    Item(3, 104, FAILED, "timeout"),
    Item(4, 105, FAILED, "upstream_error"),
]


async def record(store: JobStore) -> None:
    await store.record("r1", MIXED, upstream_calls=2, now=NOW + 1)


async def record_failures(store: JobStore) -> None:
    failures = [Item(0, 101, FAILED, "timeout"), Item(1, 102, FAILED, "timeout")]
    await store.record("r1", failures, upstream_calls=1, now=NOW + 1)


async def cancel_and_retry(store: JobStore) -> None:
    """Someone cancels the job and retries its failed ids before the cut-short record is
    settled."""
    await store.update("r1", {"status": "cancelled", "finished_at": NOW}, only_if=ACTIVE)
    with contextlib.suppress(JobConflict):  # refused while the record may still count
        await store.retry_failed("r1", NOW + 2)


async def a_finished_job_with_failures(store: JobStore) -> None:
    await store.create(make_job("f1", total=4), IDS[:4])
    items = [Item(0, 101, FOUND), Item(1, 102, FAILED, "timeout"), Item(2, 103, FAILED, "auth")]
    await store.record("f1", [*items, Item(3, 104, NOT_FOUND)], upstream_calls=1, now=NOW)
    await store.update("f1", {"status": "completed", "finished_at": NOW})


async def retry_failed(store: JobStore) -> None:
    await store.retry_failed("f1", NOW + 1)


async def retry_again(store: JobStore) -> None:
    """The client got an error: it retries while the job still says it has failed ids
    to retry (the API's own check)."""
    job = await store.get("f1")
    if job is not None and job.status in FINISHED and (job.failed or job.status == "failed"):
        await store.retry_failed("f1", NOW + 2)


async def a_cancelled_job(store: JobStore) -> None:
    await store.create(make_job("d1", total=len(IDS)), IDS)
    await store.record("d1", MIXED[:2], upstream_calls=1, now=NOW)
    await store.update("d1", {"status": "cancelled"}, only_if=ACTIVE)


async def delete(store: JobStore) -> None:
    await store.delete("d1")


async def delete_again(store: JobStore) -> None:
    """The admin got an error: deletes again while the job can still be read."""
    if await store.get("d1") is not None:
        await store.delete("d1")
    assert await store.get("d1") is None


async def a_range_job(store: JobStore) -> None:
    job = make_job("g1", total=10, range_first=500)
    job.materialised = 0
    await store.create(job, [])


async def materialise(store: JobStore) -> None:
    await store.materialise("g1", 0, range(500, 504))


SCENARIOS = {
    "create": Scenario(nothing, create, submit_again),
    "record": Scenario(six_pending, record, record),
    "record_then_retry": Scenario(six_pending, record_failures, cancel_and_retry),
    "retry_failed": Scenario(a_finished_job_with_failures, retry_failed, retry_again),
    "delete": Scenario(a_cancelled_job, delete, delete_again),
    "materialise": Scenario(a_range_job, materialise, materialise),
}


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Several writes per operation even with six ids, so that a failure can fall between
    # two chunks of the same operation.
    monkeypatch.setattr("app.jobs.mongo.CHUNK", 2)
    monkeypatch.setattr("app.jobs.mongo.DELETE_CHUNK", 2)
    monkeypatch.setattr("app.jobs.sqlite.DELETE_CHUNK", 2)


@pytest.mark.parametrize("fault", list(Fault), ids=[f.value for f in Fault])
@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_a_failure_between_any_two_writes_leaves_the_jobs_right(
    job_stores: JobStores, name: str, fault: Fault
) -> None:
    scenario = SCENARIOS[name]
    tried = 0
    for fail_at in range(1, MAX_WRITES + 1):
        database = f"{name}-{fault.value}-{fail_at}"
        store = await job_stores.open(database)
        await scenario.setup(store)
        faults = Faults(fail_at=fail_at, fault=fault)
        inject(store, faults)
        try:
            await scenario.operation(store)
        except (Crash, StoreUnavailable):
            tried += 1
        else:
            assert len(faults.writes) < fail_at, "a failing write went unnoticed"
            break  # the operation has fewer writes than `fail_at`: every point is tried
        await assert_whole(store)
        if fault is Fault.CRASH:
            store = await job_stores.open(database)  # the process starts again
        else:
            faults.fail_at = None  # the same process goes on; the store answers again
        await scenario.retry(store)
        await run_jobs(store, settled=False)  # rounds before the failure is settled
        await recover(job_stores, store)
        await run_jobs(store, settled=True)
        await assert_consistent(store)
    else:
        raise AssertionError(f"{name} wrote more than {MAX_WRITES} times")
    assert tried >= 1
