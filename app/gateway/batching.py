"""The queue of ids waiting for Freelancer, one lane per priority, and how a batch is gathered."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

# A waiting client first, then crawl jobs, then refreshes of stale hits, then the sweep.
PRIORITY_MISS = 0
PRIORITY_JOB = 1
PRIORITY_REFRESH = 2
PRIORITY_SWEEP = 3
LANES = 4
MISS_FIRST = (PRIORITY_MISS, PRIORITY_JOB, PRIORITY_REFRESH, PRIORITY_SWEEP)
JOB_FIRST = (PRIORITY_JOB, PRIORITY_MISS, PRIORITY_REFRESH, PRIORITY_SWEEP)


class BatchQueue:
    """A bounded queue of ids in priority lanes, first in first out within a lane.

    A batch takes its ids lane by lane, waiting for the first, draining what is queued
    already, and waiting at most `window_s` for more only while it is not full: a batch
    window that never adds latency to a full batch or to an idle gateway's first id.

    Jobs are not starved by a flood of misses: while the misses alone fill batches and
    jobs wait, `job_share` of the batches start with the job lane.
    """

    def __init__(self, maxsize: int, *, job_share: float = 0.0) -> None:
        self.maxsize = maxsize
        self.job_share = job_share
        self._lanes: list[deque[int]] = [deque() for _ in range(LANES)]
        self._size = 0
        self._ready = asyncio.Event()
        self._credit = 0.0

    def put_nowait(self, user_id: int, priority: int) -> None:
        """Queue an id; raises asyncio.QueueFull when there is no room."""
        if self._size >= self.maxsize:
            raise asyncio.QueueFull
        self._lanes[priority].append(user_id)
        self._size += 1
        self._ready.set()

    @property
    def room(self) -> int:
        """How many more ids fit."""
        return self.maxsize - self._size

    def qsize(self, priority: int | None = None) -> int:
        """Ids queued (in one lane, when given)."""
        return self._size if priority is None else len(self._lanes[priority])

    def clear(self) -> None:
        """Drop every queued id."""
        for lane in self._lanes:
            lane.clear()
        self._size = 0
        self._ready.clear()

    async def next_batch(
        self, batch: list[int], size: int, window_s: float, accept: Callable[[int], bool]
    ) -> None:
        """Fill `batch` with up to `size` ids that `accept` takes (it may refuse stale ones)."""
        order: tuple[int, ...] = MISS_FIRST
        while not batch:
            await self._ready.wait()
            order = self._order(size)
            self._drain(batch, size, accept, order)
        if len(batch) >= size or window_s <= 0:
            return
        deadline = asyncio.get_running_loop().time() + window_s
        while len(batch) < size:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._ready.wait()
            except TimeoutError:
                return
            self._drain(batch, size, accept, order)

    def _order(self, size: int) -> tuple[int, ...]:
        """The lanes this batch takes from, in turn: jobs first for their share of batches
        while misses alone would fill every batch."""
        misses, jobs = self._lanes[PRIORITY_MISS], self._lanes[PRIORITY_JOB]
        if not jobs or len(misses) < size:
            return MISS_FIRST
        self._credit += self.job_share
        if self._credit < 1.0:
            return MISS_FIRST
        self._credit -= 1.0
        return JOB_FIRST

    def _drain(
        self, batch: list[int], size: int, accept: Callable[[int], bool], order: tuple[int, ...]
    ) -> None:
        for priority in order:
            lane = self._lanes[priority]
            while lane and len(batch) < size:
                user_id = lane.popleft()
                self._size -= 1
                if accept(user_id):
                    batch.append(user_id)
        if not self._size:
            self._ready.clear()
