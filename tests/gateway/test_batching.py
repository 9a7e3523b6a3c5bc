"""The queue's lanes: a batch takes the lane that got the call first, then fills up from the
others (misses, jobs, refreshes, the sweep), and says which budget lanes wait."""

from __future__ import annotations

import asyncio

import pytest

from app.gateway.batching import (
    PRIORITY_JOB,
    PRIORITY_MISS,
    PRIORITY_REFRESH,
    PRIORITY_SWEEP,
    BatchQueue,
)
from app.gateway.budget import JOBS, MISSES, REFRESHES


def take_all(uid: int) -> bool:
    return True


def filled() -> BatchQueue:
    queue = BatchQueue(100)
    for uid in (1, 2):
        queue.put_nowait(uid, PRIORITY_REFRESH)
    for uid in (10, 11, 12):
        queue.put_nowait(uid, PRIORITY_JOB)
    queue.put_nowait(100, PRIORITY_MISS)
    return queue


async def test_a_misses_batch_takes_misses_then_fills_with_job_ids_then_refreshes() -> None:
    queue = filled()
    batch: list[int] = []
    await queue.gather(batch, MISSES, 5, 0.0, take_all)
    assert batch == [100, 10, 11, 12, 1]
    assert queue.qsize() == 1 and queue.room == 99


async def test_a_jobs_batch_takes_job_ids_first() -> None:
    queue = filled()
    batch: list[int] = []
    await queue.gather(batch, JOBS, 4, 0.0, take_all)
    assert batch == [10, 11, 12, 100]


async def test_a_queue_full_of_clients_ids_still_takes_a_jobs_and_its_ids_take_no_room() -> None:
    queue = BatchQueue(2)
    queue.put_nowait(1, PRIORITY_MISS)
    queue.put_nowait(2, PRIORITY_REFRESH)
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait(3, PRIORITY_MISS)
    queue.put_nowait(10, PRIORITY_JOB)  # a job owed its share is not kept out of line
    assert queue.qsize() == 3 and queue.lanes_waiting() == {MISSES, JOBS, REFRESHES}
    batch: list[int] = []
    await queue.gather(batch, MISSES, 1, 0.0, take_all)
    assert queue.room == 1, "the job's id took none of the clients' room"
    queue.put_nowait(4, PRIORITY_MISS)


async def test_refreshes_fill_at_most_half_the_queue_and_clients_keep_the_rest() -> None:
    queue = BatchQueue(10)
    for uid in range(5):
        queue.put_nowait(uid, PRIORITY_REFRESH if uid % 2 else PRIORITY_SWEEP)
    assert queue.room_for(PRIORITY_REFRESH) == 0 and queue.room_for(PRIORITY_SWEEP) == 0
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait(5, PRIORITY_REFRESH)
    assert queue.room_for(PRIORITY_MISS) == queue.room == 5
    for uid in range(10, 15):
        queue.put_nowait(uid, PRIORITY_MISS)
    assert queue.room_for(PRIORITY_MISS) == 0 and queue.room_for(PRIORITY_JOB) > 0


async def test_the_sweep_spends_as_a_refresh_and_lanes_waiting_says_so() -> None:
    queue = BatchQueue(100)
    assert queue.lanes_waiting() == set()
    queue.put_nowait(7, PRIORITY_SWEEP)
    assert queue.lanes_waiting() == {REFRESHES}
    queue.put_nowait(8, PRIORITY_MISS)
    assert queue.lanes_waiting() == {REFRESHES, MISSES}
    batch: list[int] = []
    await queue.gather(batch, REFRESHES, 1, 0.0, take_all)
    assert batch == [7]


async def test_an_empty_queue_gives_an_empty_batch_at_once() -> None:
    queue = BatchQueue(2)
    batch: list[int] = []
    await asyncio.wait_for(queue.gather(batch, MISSES, 10, 5.0, take_all), 1)
    assert batch == []
