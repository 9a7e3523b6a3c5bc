"""Crawl jobs: submit many ids or a range, follow progress, download results, cancel, retry.

Roles (app.access): submitting needs `crawl`; reading jobs and results needs `read`;
cancel and retry-failed need the job's own key or `admin`; delete needs `admin`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Callable, Collection
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from app.access import Client
from app.config import Settings
from app.dependencies import AdminClient, CrawlClient, GatewayDep, ReadClient, log_audit
from app.domain import UserRecord
from app.errors import (
    InvalidRequest,
    JobConflict,
    JobNotFound,
    ShuttingDown,
    UnsupportedMediaType,
)
from app.jobs.model import ACTIVE, FAILED, FINISHED, FOUND, NOT_FOUND, Item, Job, new_job_id
from app.jobs.runner import JobRunner
from app.jobs.schemas import (
    CALLBACK_PATTERN,
    CSV_PATTERN,
    RESULT_COLUMNS,
    TEXT_PATTERN,
    Deleted,
    JobList,
    JobOptions,
    JobRequest,
    JobView,
    ResultPage,
    parse_json,
    parse_text,
    result_item,
    result_row,
)
from app.models import ErrorResponse

router = APIRouter(prefix="/api/jobs", tags=["jobs"])

PAGE = 1000
"""Items read from the store at a time while streaming results."""
JobId = Annotated[str, Path(max_length=64, description="The id POST /api/jobs answered")]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (404, 409, 413, 415, 422, 503)
}
JOB_LINKS = {
    name: {
        "operationId": operation,
        "parameters": {"job_id": "$response.body#/job_id"},
        "description": description,
    }
    for name, operation, description in (
        ("GetJob", "get_job", "The job's status and progress."),
        ("GetResults", "job_results", "The users it found."),
        ("CancelJob", "cancel_job", "Stop it."),
        ("RetryFailed", "retry_failed", "Fetch its failed ids again once it ended."),
        ("DeleteJob", "delete_job", "Remove it."),
    )
}
SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": JobRequest.model_json_schema()},
            "text/plain": {
                "schema": {"type": "string", "pattern": TEXT_PATTERN},
                "example": "# sellers\n1001\n1002\n97\n",
            },
            "text/csv": {
                "schema": {"type": "string", "pattern": CSV_PATTERN},
                "example": "user_id,note\n1001,first\n1002,\n",
            },
        },
    }
}


def get_runner(request: Request) -> JobRunner:
    """The running job runner; 503 outside the lifespan."""
    runner: JobRunner | None = getattr(request.app.state, "jobs", None)
    if runner is None:
        raise ShuttingDown("the gateway is not running")
    return runner


RunnerDep = Annotated[JobRunner, Depends(get_runner)]


async def load(runner: JobRunner, job_id: str) -> Job:
    job = await runner.store.get(job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id!r}: it never existed or was deleted")
    return job


def view(runner: JobRunner, job: Job) -> dict[str, Any]:
    return JobView.of(job, runner.eta_s(job)).model_dump(mode="json")


@router.post(
    "",
    status_code=202,
    response_model=JobView,
    responses={**ERRORS, 202: {"links": JOB_LINKS}},
    summary="Submit a crawl job",
    operation_id="submit_job",
    openapi_extra=SUBMIT_BODY,
)
async def submit(
    request: Request,
    runner: RunnerDep,
    client: CrawlClient,
    label: Annotated[str | None, Query(max_length=200)] = None,
    priority: Literal["high", "normal", "low"] = "normal",
    max_age_s: Annotated[float | None, Query(ge=0)] = None,
    callback_url: Annotated[str | None, Query(max_length=2000, pattern=CALLBACK_PATTERN)] = None,
) -> Response:
    """Fetch many ids in the background (`crawl`): `{"user_ids": [...]}` (up to
    JOB_MAX_IDS), `{"id_range": [first, last]}` (first <= last, up to JOB_MAX_RANGE ids:
    rules the schema cannot state, answered 422), or a text/plain or
    text/csv body with one id per line (its options as query parameters). Answers 202 with
    the job and its `Location`; the job runs within Freelancer's minute and hour budget."""
    settings: Settings = request.app.state.settings
    body = await request.body()
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    ids: list[int] | range
    options: JobOptions
    if kind == "application/json":
        options, ids = parse_json(body, settings)
    elif kind in ("text/plain", "text/csv"):
        try:
            options = JobOptions(
                label=label, priority=priority, max_age_s=max_age_s, callback_url=callback_url
            )
        except ValidationError as exc:
            raise InvalidRequest(f"query: {exc.errors()[0]['msg']}") from None
        ids = parse_text(body, settings, csv=kind == "text/csv")
    else:
        raise UnsupportedMediaType(
            f"send the ids as application/json, text/plain or text/csv, not {kind!r}"
        )
    if options.callback_url and settings.webhook_secret is None:
        raise InvalidRequest(
            "callback_url needs WEBHOOK_SECRET set on the gateway: callbacks are signed with it"
        )
    now = runner.clock()
    is_range = isinstance(ids, range)
    job = Job(
        job_id=new_job_id(now),
        status="pending",
        priority=options.priority,
        total=len(ids),
        materialised=0 if is_range else len(ids),
        range_first=ids.start if isinstance(ids, range) else None,
        label=options.label,
        owner=client.name,
        max_age_s=settings.cache_ttl_s if options.max_age_s is None else options.max_age_s,
        callback_url=options.callback_url,
        created_at=now,
        updated_at=now,
    )
    await runner.store.create(job, [] if isinstance(ids, range) else ids)
    runner.wake()
    log_audit(client, "job_submit", job.total)
    return Response(
        orjson.dumps(view(runner, job)),
        status_code=202,
        media_type="application/json",
        headers={"Location": f"/api/jobs/{job.job_id}"},
    )


@router.get(
    "",
    response_model=JobList,
    responses=ERRORS,
    summary="List jobs",
    operation_id="list_jobs",
)
async def list_jobs(
    runner: RunnerDep,
    client: ReadClient,
    status: Literal["pending", "running", "completed", "failed", "cancelled"] | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    """Jobs, newest first (`read`); `next_cursor` pages to older ones."""
    jobs = await runner.store.list_jobs(status=status, limit=limit, before=cursor)
    return {
        "jobs": [view(runner, job) for job in jobs],
        "next_cursor": jobs[-1].job_id if len(jobs) == limit else None,
    }


@router.get(
    "/{job_id}",
    response_model=JobView,
    responses=ERRORS,
    summary="A job's status",
    operation_id="get_job",
)
async def get_job(job_id: JobId, runner: RunnerDep, client: ReadClient) -> dict[str, Any]:
    """Status, counts, progress and ETA (`read`)."""
    return view(runner, await load(runner, job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobView,
    responses=ERRORS,
    summary="Cancel a job",
    operation_id="cancel_job",
)
async def cancel_job(job_id: JobId, runner: RunnerDep, client: ReadClient) -> dict[str, Any]:
    """Stop a pending or running job (its own key, or `admin`); what is done stays."""
    job = own(await load(runner, job_id), client)
    now = runner.clock()
    changes: dict[str, Any] = {"status": "cancelled", "finished_at": now, "updated_at": now}
    if job.callback_url:
        changes |= {"webhook": "pending", "webhook_next_at": now, "webhook_attempts": 0}
    if not await runner.store.update(job_id, changes, only_if=ACTIVE):
        raise JobConflict(f"job {job_id} is {job.status}: only a pending or running job stops")
    log_audit(client, "job_cancel", job.total)
    runner.webhooks.wake()
    return view(runner, await load(runner, job_id))


@router.post(
    "/{job_id}/retry-failed",
    status_code=202,
    response_model=JobView,
    responses=ERRORS,
    summary="Retry a job's failed ids",
    operation_id="retry_failed",
)
async def retry_failed(job_id: JobId, runner: RunnerDep, client: ReadClient) -> dict[str, Any]:
    """Put a finished job's failed ids back to be fetched (its own key, or `admin`)."""
    job = own(await load(runner, job_id), client)
    if job.status not in FINISHED:
        raise JobConflict(f"job {job_id} is {job.status}: retry-failed applies once it ended")
    if job.failed == 0 and job.status != "failed":
        raise JobConflict(f"job {job_id} has no failed ids to retry")
    retried = await runner.store.retry_failed(job_id, runner.clock())
    log_audit(client, "job_retry_failed", retried)
    runner.wake()
    return view(runner, await load(runner, job_id))


@router.delete(
    "/{job_id}",
    response_model=Deleted,
    responses=ERRORS,
    summary="Delete a job",
    operation_id="delete_job",
)
async def delete_job(job_id: JobId, runner: RunnerDep, client: AdminClient) -> Deleted:
    """Remove a job and its per-id results (`admin`); a running job stops first. The users
    it fetched stay cached."""
    await load(runner, job_id)
    await runner.store.update(job_id, {"status": "cancelled"}, only_if=ACTIVE)
    deleted = await runner.store.delete(job_id)
    log_audit(client, "job_delete", 1)
    return Deleted(job_id=job_id, deleted=deleted)


@router.get(
    "/{job_id}/results",
    response_model=ResultPage,
    responses={
        **ERRORS,
        200: {"content": {"application/x-ndjson": {}, "text/csv": {}}},
    },
    summary="A job's results",
    operation_id="job_results",
)
async def results(
    request: Request,
    job_id: JobId,
    runner: RunnerDep,
    gateway: GatewayDep,
    client: ReadClient,
    cursor: Annotated[int, Query(ge=-1, description="next_cursor of the previous page")] = -1,
    limit: Annotated[int, Query(ge=1, le=10_000)] = PAGE,
    include: Literal["missing"] | None = None,
    format: Literal["json", "ndjson", "csv"] | None = None,
) -> Response:
    """The users a job found (`read`), with `include=missing` its `not_found` and `failed`
    ids too: JSON pages by cursor, or the whole job streamed as NDJSON
    (`Accept: application/x-ndjson`) or CSV (`Accept: text/csv` or `format=csv`)."""
    await load(runner, job_id)
    states = (FOUND, NOT_FOUND, FAILED) if include == "missing" else (FOUND,)
    accept = request.headers.get("accept", "")
    chosen = format or (
        "csv" if "text/csv" in accept else "ndjson" if "application/x-ndjson" in accept else "json"
    )
    if chosen == "json":
        items = await runner.store.items(job_id, after=cursor, limit=limit, states=states)
        users = await users_of(gateway.store, items)
        page = {
            "job_id": job_id,
            "items": [result_item(i, users.get(i.user_id)) for i in items],
            "next_cursor": str(items[-1].seq) if len(items) == limit else None,
        }
        return Response(orjson.dumps(page), media_type="application/json")
    render = _csv_page if chosen == "csv" else _ndjson_page
    media = "text/csv; charset=utf-8" if chosen == "csv" else "application/x-ndjson"
    name = f"job-{job_id}.{chosen}"
    return StreamingResponse(
        stream(runner, gateway.store, job_id, states, render, header=chosen == "csv"),
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


def own(job: Job, client: Client) -> Job:
    """The job, if `client` submitted it or is an admin."""
    if job.owner != client.name:
        client.require("admin")
    return job


async def users_of(store: Any, items: list[Item]) -> dict[int, UserRecord]:
    found = [i.user_id for i in items if i.state == FOUND]
    return await store.get_many(found) if found else {}


async def stream(
    runner: JobRunner,
    users: Any,
    job_id: str,
    states: Collection[int],
    render: Callable[[list[Item], dict[int, UserRecord]], bytes],
    *,
    header: bool,
) -> AsyncIterator[bytes]:
    """The job's items page by page: constant memory whatever the job's size."""
    if header:
        yield _csv([list(RESULT_COLUMNS)])
    after = -1
    while True:
        items = await runner.store.items(job_id, after=after, limit=PAGE, states=states)
        if not items:
            return
        yield render(items, await users_of(users, items))
        after = items[-1].seq


def _ndjson_page(items: list[Item], users: dict[int, UserRecord]) -> bytes:
    return b"".join(orjson.dumps(result_item(i, users.get(i.user_id))) + b"\n" for i in items)


def _csv_page(items: list[Item], users: dict[int, UserRecord]) -> bytes:
    return _csv(result_row(i, users.get(i.user_id)) for i in items)


def _csv(rows: Any) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(rows)
    return out.getvalue().encode()
