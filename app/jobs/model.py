"""What a crawl job is: its record, its states, and the state of each of its ids."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from app.domain import iso
from app.jobs.callback_url import masked

JobStatus = Literal["pending", "running", "completed", "failed", "cancelled"]
Priority = Literal["high", "normal", "low"]
STATUSES: tuple[JobStatus, ...] = get_args(JobStatus)
ACTIVE: tuple[JobStatus, ...] = ("pending", "running")
FINISHED: tuple[JobStatus, ...] = ("completed", "failed", "cancelled")
PRIORITY_RANK: dict[str, int] = {"high": 0, "normal": 1, "low": 2}
# Statuses a store gives a job while it is half written or half removed: no reader ever
# sees such a job (get, list, count and active leave it out), and no runner acts on it.
CREATING, DELETING = "creating", "deleting"
HIDDEN: tuple[str, ...] = (CREATING, DELETING)

# One id of a job: waiting, or how it ended.
PENDING, FOUND, NOT_FOUND, FAILED = 0, 1, 2, 3
ITEM_STATES = {FOUND: "found", NOT_FOUND: "not_found", FAILED: "failed"}


@dataclass(slots=True)
class Job:
    """A job as the store keeps it. Times are Unix seconds; counters cover every id."""

    job_id: str
    status: str
    priority: str
    total: int
    materialised: int
    """Ids written as items so far: a list's all at once, a range's chunk by chunk."""
    range_first: int | None = None
    """First id of an `id_range` job (its items are `range_first + seq`)."""
    label: str | None = None
    owner: str | None = None
    max_age_s: float = 86400.0
    callback_url: str | None = None
    done: int = 0
    found: int = 0
    not_found: int = 0
    failed: int = 0
    upstream_calls: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    updated_at: float = 0.0
    finished_at: float | None = None
    error: str | None = None
    webhook: str | None = None
    webhook_attempts: int = 0
    webhook_error: str | None = None
    webhook_next_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Every field, for a store to write."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def rank(self) -> int:
        """Its priority as a sort key: high first."""
        return PRIORITY_RANK.get(self.priority, 1)


JOB_FIELDS = tuple(f.name for f in fields(Job))


def job_view(job: Job, eta_s: float | None = None) -> dict[str, Any]:
    """The job as the API and its callback show it (`app.http.schemas.jobs.JobView`)."""
    first = job.range_first
    webhook = None
    if job.webhook is not None:
        webhook = {
            "state": job.webhook,
            "attempts": job.webhook_attempts,
            "last_error": job.webhook_error,
        }
    return {
        "job_id": job.job_id,
        "status": job.status,
        "label": job.label,
        "priority": job.priority,
        "owner": job.owner,
        "total": job.total,
        "done": job.done,
        "found": job.found,
        "not_found": job.not_found,
        "failed": job.failed,
        "progress": round(job.done / job.total, 4) if job.total else 1.0,
        "upstream_calls": job.upstream_calls,
        "eta_s": None if eta_s is None else float(eta_s),
        "max_age_s": float(job.max_age_s),
        "id_range": None if first is None else [first, first + job.total - 1],
        "callback_url": masked(job.callback_url),
        "created_at": iso(job.created_at) or "",
        "started_at": iso(job.started_at),
        "updated_at": iso(job.updated_at) or "",
        "finished_at": iso(job.finished_at),
        "error": job.error,
        "webhook": webhook,
    }


def check_fields(changes: Mapping[str, Any]) -> None:
    """Refuse names that are not a job's fields (a store builds its updates from them)."""
    unknown = set(changes) - set(JOB_FIELDS)
    if unknown:
        raise ValueError(f"not job fields: {sorted(unknown)}")


def new_job_id(now: float) -> str:
    """An id that sorts by creation time (newest last), unguessable in its second half."""
    return f"{int(now * 1000):012x}{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class Item:
    """One id of a job: its position in the job, the id, its state, and why it failed."""

    seq: int
    user_id: int
    state: int
    reason: str | None = None
