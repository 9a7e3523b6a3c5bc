"""The records of work in flight (one id's fetch, one lookup waiting on fetches), and waiting
for that work to end."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.domain import UserRecord
from app.gateway.memory import Answers
from app.gateway.results import Outcome


@dataclass(slots=True)
class Fetch:
    """One id's fetch in flight: the Future its waiters await."""

    future: asyncio.Future[Outcome]
    previous: UserRecord | None
    """The copy being refreshed, if any: its `created_at` is kept."""
    waiters: int = 0
    request_id: str | None = None
    """The request that started the fetch: the worker's log lines name it."""
    taken: int = 0
    """The number of the batch that took the id off the queue (0: not taken yet): an id is
    never put in two batches, and a job counts the upstream calls its ids went out in."""
    background: bool = False
    """Started by a crawl job: unless a client joined it, its user is not added to memory."""
    elsewhere: bool = False
    """Answered by another process's fetch: no upstream call was spent on it here."""
    ahead: bool = False
    """Queued by refresh-ahead (a popular user about to turn stale)."""
    leader_only: bool = False
    """Queued by a duty of the leader (refresh-ahead, the sweep): dropped, not fetched, if
    the lead has moved before its call goes and no client waits for it."""


@dataclass(slots=True)
class PendingLookup:
    """A lookup that memory could not answer whole: what it has so far, and its deadline."""

    user_ids: Sequence[int]
    pending: list[int]
    deadline: float
    answers: Answers = field(default_factory=dict)
    previous: dict[int, UserRecord] = field(default_factory=dict)
    allow_misses: Callable[[int], int] | None = None
    """How many of n new ids the caller may send upstream (the rest: `quota`); None: all.
    Called with no await around it, where the ids are registered: a quota taken there
    cannot be taken twice by parallel lookups."""
    started: list[Fetch] = field(default_factory=list)
    """The fetches this lookup started (its new ids)."""

    @property
    def fetched_here(self) -> int:
        """How many of the fetches it started were not answered by another process's
        fetch: the new ids that spent (or may still spend) an upstream call here."""
        return sum(not fetch.elsewhere for fetch in self.started)


async def cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    """Cancel tasks and wait until every one has finished."""
    for task in list(tasks):
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_idle(
    inflight: Mapping[int, Fetch], batches: set[asyncio.Task[None]], within_s: float
) -> bool:
    """Wait until no fetch is in flight and no batch task runs; False after `within_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while inflight or batches:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        futures: list[asyncio.Future[Any]] = [f.future for f in inflight.values()]
        await asyncio.wait([*futures, *batches], timeout=remaining)
    return True
