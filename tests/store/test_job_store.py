"""The `JobStore` contract: every store keeps jobs and their ids the same way."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from app.errors import JobConflict
from app.jobs import mongo, sqlite
from app.jobs.model import FAILED, FOUND, NOT_FOUND, PENDING, Item, Job
from app.jobs.mongo import MongoJobStore
from app.jobs.store import JobStore
from tests.support.store_faults import Faults, inject

NOW = 1_700_000_000.0


def make_job(job_id: str, *, total: int, status: str = "pending", **fields: object) -> Job:
    job = Job(job_id=job_id, status=status, priority="normal", total=total, materialised=total)
    for name, value in {"created_at": NOW, "updated_at": NOW, **fields}.items():
        setattr(job, name, value)
    return job


async def test_a_job_and_its_ids_are_saved_and_read_back_in_order(job_store: JobStore) -> None:
    job = make_job("a1", total=5, label="first", owner="crawler", callback_url="http://x/")
    await job_store.create(job, [50, 40, 30, 20, 10])
    assert await job_store.get("a1") == job
    assert await job_store.get("nope") is None
    first = await job_store.pending_items("a1", after=-1, limit=2)
    assert first == [Item(0, 50, PENDING), Item(1, 40, PENDING)]
    rest = await job_store.pending_items("a1", after=first[-1].seq, limit=10)
    assert [i.user_id for i in rest] == [30, 20, 10]


async def test_recording_moves_items_and_counts_each_once(job_store: JobStore) -> None:
    await job_store.create(make_job("r1", total=4), [1, 2, 3, 4])
    done = [Item(0, 1, FOUND), Item(1, 2, NOT_FOUND), Item(2, 3, FAILED, "timeout")]
    await job_store.record("r1", done, upstream_calls=1, now=NOW + 5)
    await job_store.record("r1", done, upstream_calls=0, now=NOW + 6)  # replayed
    job = await job_store.get("r1")
    assert job is not None
    assert (job.done, job.found, job.not_found, job.failed) == (3, 1, 1, 1)
    assert (job.upstream_calls, job.updated_at) == (1, NOW + 6)
    assert await job_store.pending_items("r1", after=-1, limit=10) == [Item(3, 4, PENDING)]
    missing = await job_store.items("r1", after=-1, limit=10, states=(NOT_FOUND, FAILED))
    assert missing == [Item(1, 2, NOT_FOUND), Item(2, 3, FAILED, "timeout")]


async def test_a_range_is_materialised_in_chunks(job_store: JobStore) -> None:
    job = make_job("g1", total=1000, range_first=5000)
    job.materialised = 0
    await job_store.create(job, [])
    await job_store.materialise("g1", 0, range(5000, 5100))
    await job_store.materialise("g1", 0, range(5000, 5100))  # a chunk written twice
    await job_store.materialise("g1", 100, range(5100, 5200))
    stored = await job_store.get("g1")
    assert stored is not None and stored.materialised == 200
    items = await job_store.pending_items("g1", after=-1, limit=1000)
    assert [i.user_id for i in items] == list(range(5000, 5200))


async def test_update_only_in_an_allowed_status(job_store: JobStore) -> None:
    await job_store.create(make_job("u1", total=1, status="completed"), [1])
    assert not await job_store.update("u1", {"status": "cancelled"}, only_if=("pending",))
    assert await job_store.update("u1", {"label": "renamed"})
    job = await job_store.get("u1")
    assert job is not None and (job.status, job.label) == ("completed", "renamed")
    assert not await job_store.update("missing", {"label": "x"})
    with pytest.raises(ValueError, match="not job fields"):
        await job_store.update("u1", {"status; DROP TABLE jobs": "x"})


async def test_listing_is_newest_first_paged_and_filtered(job_store: JobStore) -> None:
    for n, status in enumerate(["completed", "pending", "running", "pending"]):
        await job_store.create(make_job(f"j{n}", total=1, status=status), [n])
    page = await job_store.list_jobs(status=None, limit=3, before=None)
    assert [j.job_id for j in page] == ["j3", "j2", "j1"]
    more = await job_store.list_jobs(status=None, limit=3, before=page[-1].job_id)
    assert [j.job_id for j in more] == ["j0"]
    pending = await job_store.list_jobs(status="pending", limit=10, before=None)
    assert [j.job_id for j in pending] == ["j3", "j1"]
    assert sorted(j.job_id for j in await job_store.active()) == ["j1", "j2", "j3"]
    assert await job_store.count_by_status() == {"completed": 1, "pending": 2, "running": 1}


async def test_retry_failed_puts_failed_ids_back_and_reopens_the_job(
    job_store: JobStore,
) -> None:
    await job_store.create(make_job("f1", total=3), [1, 2, 3])
    items = [Item(0, 1, FOUND), Item(1, 2, FAILED, "timeout"), Item(2, 3, FAILED, "auth")]
    await job_store.record("f1", items, upstream_calls=1, now=NOW)
    await job_store.update("f1", {"status": "completed", "finished_at": NOW, "webhook": "failed"})
    assert await job_store.retry_failed("f1", NOW + 1) == 2
    job = await job_store.get("f1")
    assert job is not None
    assert (job.status, job.done, job.failed, job.found) == ("pending", 1, 0, 1)
    assert (job.finished_at, job.webhook) == (None, None)
    assert [i.user_id for i in await job_store.pending_items("f1", after=-1, limit=9)] == [2, 3]


async def test_delete_removes_the_job_and_its_ids(job_store: JobStore) -> None:
    await job_store.create(make_job("d1", total=2), [1, 2])
    await job_store.create(make_job("d2", total=1), [1])
    assert await job_store.delete("d1")
    assert not await job_store.delete("d1")
    assert await job_store.get("d1") is None
    assert await job_store.items("d1", after=-1, limit=9, states=(PENDING,)) == []
    assert len(await job_store.pending_items("d2", after=-1, limit=9)) == 1


async def test_due_webhooks_are_found_by_time(job_store: JobStore) -> None:
    for n, due in enumerate([NOW - 1, NOW + 60]):
        job = make_job(f"w{n}", total=1, status="completed", callback_url="http://x/")
        job.webhook, job.webhook_next_at = "pending", due
        await job_store.create(job, [n])
    await job_store.create(make_job("w9", total=1, status="completed"), [9])
    assert [j.job_id for j in await job_store.webhooks_due(NOW, 10)] == ["w0"]
    assert len(await job_store.webhooks_due(NOW + 61, 10)) == 2


async def test_retry_failed_on_a_job_still_running_changes_nothing(job_store: JobStore) -> None:
    await job_store.create(make_job("f2", total=3, status="running"), [1, 2, 3])
    await job_store.record("f2", [Item(0, 1, FAILED, "timeout")], upstream_calls=1, now=NOW)
    with pytest.raises(JobConflict, match="f2 is not finished"):
        await job_store.retry_failed("f2", NOW + 1)
    job = await job_store.get("f2")
    assert job is not None and (job.status, job.done, job.failed) == ("running", 1, 1)
    failed = await job_store.items("f2", after=-1, limit=9, states=(FAILED,))
    assert failed == [Item(0, 1, FAILED, "timeout")], "a counted failure stays failed"


async def test_two_retries_at_once_reopen_the_job_once(job_store: JobStore) -> None:
    await job_store.create(make_job("f3", total=3), [1, 2, 3])
    items = [Item(0, 1, FOUND), Item(1, 2, FAILED, "timeout"), Item(2, 3, FAILED, "timeout")]
    await job_store.record("f3", items, upstream_calls=1, now=NOW)
    await job_store.update("f3", {"status": "completed", "finished_at": NOW})
    inject(job_store, Faults(interleave=True))  # the two interleave at every write
    tries = (job_store.retry_failed("f3", NOW + 1) for _ in range(2))
    outcomes = await asyncio.gather(*tries, return_exceptions=True)
    assert 2 in outcomes, outcomes
    assert [type(o) for o in outcomes if o != 2] == [JobConflict], "the other one is refused"
    job = await job_store.get("f3")
    assert job is not None and (job.status, job.done, job.failed) == ("pending", 1, 0)
    pending = await job_store.pending_items("f3", after=-1, limit=9)
    again = [Item(i.seq, i.user_id, FOUND) for i in pending]
    await job_store.record("f3", again, upstream_calls=1, now=NOW)
    job = await job_store.get("f3")
    assert job is not None and (job.done, job.found, job.total) == (3, 3, 3)


async def test_complete_only_once_every_id_is_done(job_store: JobStore) -> None:
    changes = {"status": "completed", "finished_at": NOW + 9}
    await job_store.create(make_job("c1", total=2, status="running"), [1, 2])
    await job_store.record("c1", [Item(0, 1, FOUND)], upstream_calls=1, now=NOW)
    assert not await job_store.complete("c1", changes), "an id is still pending"
    await job_store.record("c1", [Item(1, 2, NOT_FOUND)], upstream_calls=1, now=NOW)
    assert await job_store.complete("c1", changes)
    job = await job_store.get("c1")
    assert job is not None and (job.status, job.finished_at, job.done) == ("completed", NOW + 9, 2)
    assert not await job_store.complete("c1", changes), "already finished"
    ranged = make_job("c2", total=10, range_first=500, status="running")
    ranged.materialised = 0
    await job_store.create(ranged, [])
    assert not await job_store.complete("c2", changes), "ids of its range not written yet"
    await job_store.create(make_job("c3", total=1, status="cancelled"), [1])
    assert not await job_store.complete("c3", changes), "a stopped job stays stopped"
    assert not await job_store.complete("nope", changes)


async def test_status_says_what_the_job_is_now(job_store: JobStore) -> None:
    await job_store.create(make_job("s1", total=2), [1, 2])
    assert await job_store.status("s1") == "pending"
    await job_store.update("s1", {"status": "cancelled"}, only_if=("pending", "running"))
    assert await job_store.status("s1") == "cancelled"
    assert await job_store.delete("s1")
    assert await job_store.status("s1") is None
    assert await job_store.status("nope") is None


async def test_a_stopped_or_deleted_job_gets_no_more_ids(job_store: JobStore) -> None:
    for job_id, status in (("m1", "cancelled"), ("m2", "running")):
        job = make_job(job_id, total=100, range_first=500, status=status)
        job.materialised = 0
        await job_store.create(job, [])
    assert await job_store.delete("m2")
    # The runner read both jobs before they stopped; it writes their next chunk now.
    await job_store.materialise("m1", 0, range(500, 510))
    await job_store.materialise("m2", 0, range(500, 510))
    assert await job_store.items("m1", after=-1, limit=99, states=(PENDING,)) == []
    assert await job_store.items("m2", after=-1, limit=99, states=(PENDING,)) == []
    stopped = await job_store.get("m1")
    assert stopped is not None and stopped.materialised == 0


async def test_a_job_being_deleted_is_seen_by_nobody(
    job_store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = make_job("h1", total=6, status="completed", callback_url="http://x/")
    job.webhook, job.webhook_next_at = "pending", NOW - 1
    await job_store.create(job, [1, 2, 3, 4, 5, 6])
    cast(Any, job_store).purge_s = 0.0  # time is up after each chunk
    monkeypatch.setattr("app.jobs.sqlite.DELETE_CHUNK", 2)
    monkeypatch.setattr("app.jobs.mongo.DELETE_CHUNK", 2)
    assert await job_store.delete("h1")
    assert len(await job_store.items("h1", after=-1, limit=9, states=(PENDING,))) == 4
    assert await job_store.get("h1") is None
    assert await job_store.status("h1") is None
    assert await job_store.list_jobs(status=None, limit=9, before=None) == []
    assert await job_store.count_by_status() == {}
    assert await job_store.webhooks_due(NOW, 9) == []
    assert not await job_store.update("h1", {"label": "x"})
    await job_store.record("h1", [Item(4, 5, FOUND)], upstream_calls=1, now=NOW)
    assert not await job_store.delete("h1"), "not there for a second delete"
    for _ in range(3):  # the runner's next rounds finish it, a chunk each
        await job_store.sweep()
    assert await job_store.items("h1", after=-1, limit=9, states=(PENDING, FOUND)) == []


async def test_deleting_a_big_job_goes_a_bounded_chunk_at_a_time(
    request: pytest.FixtureRequest, job_store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One statement removing 100 000 ids passes STORE_TIMEOUT_S under load and rolls back:
    no write of a delete may remove more than a chunk."""
    size = 100_000
    if request.node.callspec.params["job_store"] == "mongomock":
        # mongomock checks unique keys in linear time per insert: 100 000 ids would take
        # minutes there, so it gets fewer ids in smaller chunks.
        size = 600
        monkeypatch.setattr("app.jobs.mongo.DELETE_CHUNK", 100)
    chunk = mongo.DELETE_CHUNK if isinstance(job_store, MongoJobStore) else sqlite.DELETE_CHUNK
    await job_store.create(make_job("b1", total=size), range(1, size + 1))
    faults = Faults()
    inject(job_store, faults)
    assert await job_store.delete("b1")
    removed = [
        result.rowcount if verb == "DELETE" else result.deleted_count
        for verb, result in zip(faults.writes, faults.results, strict=True)
        if verb in ("DELETE", "delete_many", "delete_one")
    ]
    assert max(removed) <= chunk, f"one write removed {max(removed)} ids"
    assert sum(removed) == size + 1, "every id and the job"
    assert await job_store.get("b1") is None
    assert await job_store.items("b1", after=-1, limit=9, states=(PENDING,)) == []


async def test_an_update_can_expect_fields_unchanged(job_store: JobStore) -> None:
    """A callback attempt read the job, a retry reset its callback meanwhile: the
    attempt's outcome must not bring the old callback state back."""
    job = make_job("e1", total=1, status="completed", callback_url="http://x/")
    job.webhook, job.webhook_attempts = "pending", 2
    await job_store.create(job, [1])
    seen = {"webhook": "pending", "webhook_attempts": 2}
    await job_store.update("e1", {"status": "pending", "webhook": None, "webhook_attempts": 0})
    outcome = {"webhook": "failed", "webhook_attempts": 3, "webhook_error": "HTTP 500"}
    assert not await job_store.update("e1", outcome, expect=seen)
    stored = await job_store.get("e1")
    assert stored is not None and (stored.webhook, stored.webhook_attempts) == (None, 0)
    assert await job_store.update("e1", {"label": "x"}, expect={"webhook": None})
    assert not await job_store.update("e1", {"label": "y"}, expect={"status": "completed"})
    assert not await job_store.update(
        "e1", {"label": "y"}, only_if=("completed",), expect={"status": "pending"}
    ), "both conditions hold, or nothing changes"
    with pytest.raises(ValueError, match="not job fields"):
        await job_store.update("e1", {"label": "y"}, expect={"1=1 OR label": "x"})
