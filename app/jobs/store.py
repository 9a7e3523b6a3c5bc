"""The interface every job store implements: jobs and the state of each of their ids.

A job's ids are items `(job_id, seq)`; they are written in chunks (a list's at submission,
a range's as the job advances) and read in `seq` order, so no job is ever held whole in
memory. Every method raises `app.errors.StoreUnavailable` when the database fails.

A crash or a timeout between any two writes of an operation leaves no reader or runner
acting on a half-done job: a job half written or half deleted is hidden (statuses
`creating`, `deleting`), counters end equal to the items' states, and `sweep` finishes
what was cut short. How each store does it is in its module's docstring.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol

from app.config import Settings
from app.jobs.model import Item, Job
from app.store.base import UserStore


class JobStore(Protocol):
    """Where jobs live, beside the users (SQLite file or MongoDB database)."""

    async def open(self) -> None:
        """Connect and create the schema / indexes. Safe to call again after a failure."""

    async def close(self) -> None:
        """Release connections."""

    async def create(self, job: Job, user_ids: Sequence[int]) -> None:
        """Save a new job and its first `user_ids` as items 0..n-1, pending."""

    async def get(self, job_id: str) -> Job | None:
        """The job, or None (also while it is being created or deleted)."""
        ...

    async def status(self, job_id: str) -> str | None:
        """The job's status as stored now, or None when it is gone or being deleted: one
        small read, for the runner to check right before it acts on a job it read
        earlier."""
        ...

    async def list_jobs(self, *, status: str | None, limit: int, before: str | None) -> list[Job]:
        """Up to `limit` jobs, newest first, with ids below `before` when given."""
        ...

    async def active(self) -> list[Job]:
        """Every pending or running job."""
        ...

    async def update(
        self,
        job_id: str,
        changes: Mapping[str, Any],
        *,
        only_if: Collection[str] = (),
        expect: Mapping[str, Any] | None = None,
    ) -> bool:
        """Set fields of a job, only while its status is in `only_if` and its fields still
        hold the values in `expect`, when given (compare and set: a callback's outcome
        must not undo a retry that reset the callback meanwhile); True if it changed."""
        ...

    async def complete(self, job_id: str, changes: Mapping[str, Any]) -> bool:
        """Set `changes` (the job's end: status `completed`, times, callback) only if the
        job is pending or running, every id is written and none is pending, and no
        operation on it may still be counting; True if it was changed. False means: not
        yet, look again next round."""
        ...

    async def materialise(self, job_id: str, first_seq: int, user_ids: Sequence[int]) -> None:
        """Add pending items `first_seq...` and set `materialised` past them, while the job
        is pending or running (a stopped or deleted job gets no more ids)."""

    async def pending_items(self, job_id: str, *, after: int, limit: int) -> list[Item]:
        """Up to `limit` pending items with `seq > after`, in `seq` order."""
        ...

    async def record(
        self, job_id: str, items: Sequence[Item], *, upstream_calls: int, now: float
    ) -> None:
        """Items that were pending take their new state; the job's counters move by what
        changed (an item recorded twice counts once). Nothing on a deleted job."""

    async def items(
        self, job_id: str, *, after: int, limit: int, states: Collection[int]
    ) -> list[Item]:
        """Up to `limit` items in `states` with `seq > after`, in `seq` order."""
        ...

    async def retry_failed(self, job_id: str, now: float) -> int:
        """A finished job back to `pending` and its failed items with it; how many. Raises
        `JobConflict`, nothing changed, when the job is not finished (a second retry finds
        it pending) or, on MongoDB, a chunk of it may still be being counted."""
        ...

    async def delete(self, job_id: str) -> bool:
        """Hide the job at once, then remove its items in bounded chunks and the job, for
        at most STORE_TIMEOUT_S (`sweep` removes the rest); True when it was there."""
        ...

    async def sweep(self) -> None:
        """Finish, for at most STORE_TIMEOUT_S, what a crash or a timeout cut short:
        deletions, and on MongoDB counts, retries and submissions left half done. The
        runner calls it every round; it is cheap when there is nothing to do."""

    async def count_by_status(self) -> dict[str, int]:
        """How many jobs are in each status (statuses with none are left out)."""
        ...

    async def webhooks_due(self, now: float, limit: int) -> list[Job]:
        """Finished jobs whose callback is pending and due by `now`, most overdue first,
        through an index of the pending callbacks only."""
        ...


def create_job_store(settings: Settings, users: UserStore) -> JobStore:
    """Jobs beside the users: in their MongoDB database (on the same client), else in the
    SQLite file at SQLITE_PATH."""
    client = getattr(users, "client", None)
    if users.kind == "mongodb" and client is not None:
        from app.jobs.mongo import MongoJobStore

        return MongoJobStore(
            client, database=settings.database_name, timeout_s=settings.store_timeout_s
        )
    from app.jobs.sqlite import SqliteJobStore

    return SqliteJobStore(settings.sqlite_path, timeout_s=settings.store_timeout_s)
