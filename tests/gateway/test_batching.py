"""The queue's lanes: misses before jobs before refreshes, and the jobs' share of batches."""

from __future__ import annotations

from app.gateway.batching import PRIORITY_JOB, PRIORITY_MISS, PRIORITY_REFRESH, BatchQueue


def take_all(uid: int) -> bool:
    return True


async def test_a_batch_takes_misses_then_fills_with_job_ids_then_refreshes() -> None:
    queue = BatchQueue(100, job_share=0.2)
    for uid in (1, 2):
        queue.put_nowait(uid, PRIORITY_REFRESH)
    for uid in (10, 11, 12):
        queue.put_nowait(uid, PRIORITY_JOB)
    queue.put_nowait(100, PRIORITY_MISS)
    batch: list[int] = []
    await queue.next_batch(batch, 5, 0.0, take_all)
    assert batch == [100, 10, 11, 12, 1]
    assert queue.qsize() == 1 and queue.room == 99


async def test_jobs_get_their_share_of_batches_while_misses_alone_fill_every_batch() -> None:
    queue = BatchQueue(10_000, job_share=0.2)
    for uid in range(1, 2001):
        queue.put_nowait(uid, PRIORITY_MISS)
    for uid in range(100_001, 100_101):
        queue.put_nowait(uid, PRIORITY_JOB)
    batches: list[list[int]] = []
    for _ in range(10):
        batch: list[int] = []
        await queue.next_batch(batch, 10, 0.0, take_all)
        batches.append(batch)
    job_batches = [b for b in batches if b[0] > 100_000]
    assert len(job_batches) == 2, "one batch in five starts with the job lane"
    assert all(all(uid > 100_000 for uid in b) for b in job_batches)


async def test_misses_that_do_not_fill_a_batch_always_go_first() -> None:
    queue = BatchQueue(10_000, job_share=1.0)
    for round_ in range(5):
        queue.put_nowait(round_ + 1, PRIORITY_MISS)
        for uid in range(10):
            queue.put_nowait(1000 * (round_ + 1) + uid, PRIORITY_JOB)
        batch: list[int] = []
        await queue.next_batch(batch, 10, 0.0, take_all)
        assert batch[0] == round_ + 1
