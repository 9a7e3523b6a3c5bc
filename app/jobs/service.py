"""A job's lifecycle: what a submission becomes, and which states allow cancel, retry, delete.

The jobs router calls these with keyword arguments and turns what they return (or raise:
`JobNotFound`, `JobConflict`, `InvalidRequest`) into HTTP; who may call which is the
router's to check. The runner advances the jobs these create.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.errors import InvalidRequest, JobConflict, JobNotFound
from app.jobs.callback_url import check_submitted
from app.jobs.model import ACTIVE, FAILED, FINISHED, Job, new_job_id
from app.jobs.runner import JobRunner


async def get(runner: JobRunner, *, job_id: str) -> Job:
    """The job; JobNotFound when it never existed or was deleted."""
    job = await runner.store.get(job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id!r}: it never existed or was deleted")
    return job


async def create(
    runner: JobRunner,
    *,
    user_ids: Sequence[int] | range,
    owner: str,
    priority: str,
    label: str | None,
    max_age_s: float | None,
    callback_url: str | None,
) -> Job:
    """A new pending job over `user_ids` (a list, or a range written as the job advances)."""
    settings = runner.settings
    if callback_url is not None:
        if settings.webhook_secret is None:
            raise InvalidRequest(
                "callback_url needs WEBHOOK_SECRET set on the gateway: callbacks are signed with it"
            )
        await check_submitted(callback_url, allow_private=settings.webhook_allow_private)
    now = runner.clock()
    is_range = isinstance(user_ids, range)
    job = Job(
        job_id=new_job_id(now),
        status="pending",
        priority=priority,
        total=len(user_ids),
        materialised=0 if is_range else len(user_ids),
        range_first=user_ids.start if isinstance(user_ids, range) else None,
        label=label,
        owner=owner,
        max_age_s=settings.cache_ttl_s if max_age_s is None else max_age_s,
        callback_url=callback_url,
        created_at=now,
        updated_at=now,
    )
    await runner.store.create(job, [] if isinstance(user_ids, range) else user_ids)
    runner.wake()
    return job


async def cancel(runner: JobRunner, *, job: Job) -> Job:
    """Stop a pending or running job (what is done stays); JobConflict once it ended."""
    now = runner.clock()
    changes: dict[str, Any] = {"status": "cancelled", "finished_at": now, "updated_at": now}
    if job.callback_url:
        changes |= {"webhook": "pending", "webhook_next_at": now, "webhook_attempts": 0}
    if not await runner.store.update(job.job_id, changes, only_if=ACTIVE):
        raise JobConflict(f"job {job.job_id} is {job.status}: only a pending or running job stops")
    runner.webhooks.wake()
    return await get(runner, job_id=job.job_id)


async def retry_failed(runner: JobRunner, *, job: Job) -> tuple[Job, int]:
    """Fetch a finished job's failed ids again; the job that does it and how many ids.

    A completed or failed job takes them up again itself. A cancelled one is not reopened
    (its ids that never went out would go too, restarting the whole job): its failed ids
    go into a new job with its options, and the cancelled job stays as it was.
    """
    if job.status not in FINISHED:
        raise JobConflict(f"job {job.job_id} is {job.status}: retry-failed applies once it ended")
    if job.failed == 0 and job.status != "failed":
        raise JobConflict(f"job {job.job_id} has no failed ids to retry")
    if job.status == "cancelled":
        again = await create(
            runner,
            user_ids=await failed_ids(runner, job),
            owner=job.owner or "",
            priority=job.priority,
            label=job.label,
            max_age_s=job.max_age_s,
            callback_url=job.callback_url,
        )
        return again, again.total
    retried = await runner.store.retry_failed(job.job_id, runner.clock())
    runner.wake()
    return await get(runner, job_id=job.job_id), retried


async def failed_ids(runner: JobRunner, job: Job) -> list[int]:
    """The job's failed ids, read a page at a time; at most JOB_MAX_IDS of them."""
    most = runner.settings.job_max_ids
    ids: list[int] = []
    after = -1
    while page := await runner.store.items(job.job_id, after=after, limit=1000, states=(FAILED,)):
        ids += [item.user_id for item in page]
        if len(ids) > most:
            raise JobConflict(
                f"job {job.job_id} has more than JOB_MAX_IDS={most} failed ids: submit them "
                "in parts (GET its results with include=missing lists them)"
            )
        after = page[-1].seq
    if not ids:
        raise JobConflict(f"job {job.job_id} has no failed ids to retry")
    return ids


async def delete(runner: JobRunner, *, job_id: str) -> bool:
    """Remove a job and its per-id results (a running job stops first); the users stay."""
    await get(runner, job_id=job_id)
    await runner.store.update(job_id, {"status": "cancelled"}, only_if=ACTIVE)
    return await runner.store.delete(job_id)
