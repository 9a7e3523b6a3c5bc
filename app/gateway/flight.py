"""The records of work in flight: one id's fetch, and one lookup waiting on fetches."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
    taken: bool = False
    """Set when the worker takes the id off the queue: it is never put in two batches."""


@dataclass(slots=True)
class PendingLookup:
    """A lookup that memory could not answer whole: what it has so far, and its deadline."""

    user_ids: Sequence[int]
    pending: list[int]
    deadline: float
    answers: Answers = field(default_factory=dict)
    previous: dict[int, UserRecord] = field(default_factory=dict)
    allow_misses: Callable[[int], int] | None = None
    """How many of n new ids the caller may send upstream (the rest: `quota`); None: all."""
