"""The queue of ids waiting for Freelancer, one lane per priority, and how a batch is gathered."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from app.gateway.budget import JOBS, MISSES, REFRESHES

# A waiting client first, then crawl jobs, then refreshes of stale hits, then the sweep.
PRIORITY_MISS = 0
PRIORITY_JOB = 1
PRIORITY_REFRESH = 2
PRIORITY_SWEEP = 3
LANES = 4
MISS_FIRST = (PRIORITY_MISS, PRIORITY_JOB, PRIORITY_REFRESH, PRIORITY_SWEEP)
BUDGET_LANE = {
    PRIORITY_MISS: MISSES,
    PRIORITY_JOB: JOBS,
    PRIORITY_REFRESH: REFRESHES,
    PRIORITY_SWEEP: REFRESHES,
}
"""The budget lane each queue lane spends in (the sweep is a refresh)."""


def loop_clock() -> float:
    """The running loop's clock (monotonic; virtual in simulations), else time.monotonic."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


class BatchQueue:
    """A bounded queue of ids in priority lanes, first in first out within a lane.

    The planner picks the budget lane that calls next (`lanes_waiting`, `changed`); a
    batch then takes that lane's ids first and fills up from the others (a call costs the
    same with 1 id or 100), waiting at most `window_s` for more only while it is not full:
    a batch window that never adds latency to a full batch or to an idle gateway's first id.

    `maxsize` bounds the ids of clients and refreshes, and refreshes (stale hits,
    revalidation, the sweep) may fill at most half of it: they are best effort (the stale
    copy is served meanwhile; the next stale hit or sweep asks again), and a queue full of
    them would answer clients 503. Crawl jobs' ids are not counted in it and always fit:
    the job runner bounds them (UPSTREAM_CONCURRENCY - 1 chunks), and a queue full of
    clients' misses must not keep a job that is owed its share out of line.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._lanes: list[deque[int]] = [deque() for _ in range(LANES)]
        self._size = 0
        self._since = [0.0] * LANES
        """When each lane last went from empty to holding an id (`loop_clock`)."""
        self._ready = asyncio.Event()
        self.changed = asyncio.Event()
        """Set whenever an id is queued (the planner clears it before it looks)."""

    def put_nowait(self, user_id: int, priority: int) -> None:
        """Queue an id; raises asyncio.QueueFull when there is no room for its lane."""
        if self.room_for(priority) <= 0:
            raise asyncio.QueueFull
        lane = self._lanes[priority]
        if not lane:
            self._since[priority] = loop_clock()
        lane.append(user_id)
        self._size += 1
        self._ready.set()
        self.changed.set()

    @property
    def room(self) -> int:
        """How many more ids of clients or refreshes fit (a job's ids take none of it)."""
        return self.maxsize - self._size + len(self._lanes[PRIORITY_JOB])

    def room_for(self, priority: int) -> int:
        """How many more ids of this lane fit: a job's always; refreshes up to half."""
        if priority == PRIORITY_JOB:
            return self.maxsize
        if priority in (PRIORITY_REFRESH, PRIORITY_SWEEP):
            refreshes = len(self._lanes[PRIORITY_REFRESH]) + len(self._lanes[PRIORITY_SWEEP])
            return min(self.room, max(1, self.maxsize // 2) - refreshes)
        return self.room

    def qsize(self, priority: int | None = None) -> int:
        """Ids queued (in one lane, when given)."""
        return self._size if priority is None else len(self._lanes[priority])

    def oldest(self, priorities: tuple[int, ...]) -> float | None:
        """When the longest waiting of these lanes began to wait (None: all are empty). A
        lane's first id may have been taken since; its wait is counted from then anyway."""
        return min((self._since[p] for p in priorities if self._lanes[p]), default=None)

    def lanes_waiting(self) -> set[str]:
        """The budget lanes with ids queued."""
        return {BUDGET_LANE[p] for p, lane in enumerate(self._lanes) if lane}

    def clear(self) -> None:
        """Drop every queued id."""
        for lane in self._lanes:
            lane.clear()
        self._size = 0
        self._ready.clear()

    async def gather(
        self,
        batch: list[int],
        lane: str,
        size: int,
        window_s: float,
        accept: Callable[[int], bool],
    ) -> None:
        """Fill `batch` with up to `size` ids that `accept` takes (it may refuse stale ones):
        `lane`'s first, then the others'. Returns at once when nothing is queued."""
        order = (
            *(p for p in MISS_FIRST if BUDGET_LANE[p] == lane),
            *(p for p in MISS_FIRST if BUDGET_LANE[p] != lane),
        )
        self._drain(batch, size, accept, order)
        if not batch or len(batch) >= size or window_s <= 0:
            return
        deadline = asyncio.get_running_loop().time() + window_s
        while len(batch) < size:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._ready.wait()
            except TimeoutError:
                return
            self._drain(batch, size, accept, order)

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
