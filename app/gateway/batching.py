"""The queue of ids waiting for Freelancer, by priority, and how a batch is gathered from it."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

# A waiting client first, then refreshes of stale hits, then the sweep and revalidation.
PRIORITY_MISS = 0
PRIORITY_REFRESH = 1
PRIORITY_SWEEP = 2


class BatchQueue:
    """A bounded priority queue of ids, first in first out within a priority.

    A batch takes the first id (awaiting it), drains what is queued already, and waits at
    most `window_s` for more only while it is not full: a batch window that never adds
    latency to a full batch or to an idle gateway's first id.
    """

    def __init__(self, maxsize: int) -> None:
        self._queue: asyncio.PriorityQueue[tuple[int, int, int]] = asyncio.PriorityQueue(maxsize)
        self._seq = itertools.count()
        self.maxsize = maxsize

    def put_nowait(self, user_id: int, priority: int) -> None:
        """Queue an id; raises asyncio.QueueFull when there is no room."""
        self._queue.put_nowait((priority, next(self._seq), user_id))

    @property
    def room(self) -> int:
        """How many more ids fit."""
        return self.maxsize - self._queue.qsize()

    def qsize(self) -> int:
        """Ids queued."""
        return self._queue.qsize()

    def clear(self) -> None:
        """Drop every queued id."""
        while not self._queue.empty():
            self._queue.get_nowait()

    async def next_batch(
        self, batch: list[int], size: int, window_s: float, accept: Callable[[int], bool]
    ) -> None:
        """Fill `batch` with up to `size` ids that `accept` takes (it may refuse stale ones)."""
        while not batch:
            self._offer(batch, (await self._queue.get())[2], accept)
        self._drain(batch, size, accept)
        if len(batch) >= size or window_s <= 0:
            return
        deadline = asyncio.get_running_loop().time() + window_s
        while len(batch) < size:
            try:
                # asyncio.timeout, not wait_for: a cancelled Queue.get leaves its item
                # queued, while Python 3.11's wait_for can drop a just-received one.
                async with asyncio.timeout_at(deadline):
                    self._offer(batch, (await self._queue.get())[2], accept)
            except TimeoutError:
                return
            self._drain(batch, size, accept)

    def _drain(self, batch: list[int], size: int, accept: Callable[[int], bool]) -> None:
        while len(batch) < size and not self._queue.empty():
            self._offer(batch, self._queue.get_nowait()[2], accept)

    @staticmethod
    def _offer(batch: list[int], user_id: int, accept: Callable[[int], bool]) -> None:
        if accept(user_id):
            batch.append(user_id)
