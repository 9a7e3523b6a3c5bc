"""Crawl jobs: submit many ids or a range, follow progress, download results, cancel, retry.

Roles (app.http.auth): submitting needs `crawl`; reading jobs and results needs `read`;
cancel and retry-failed need the job's own key or `admin`; delete needs `admin`.
"""

from __future__ import annotations

import asyncio
import csv
import functools
import io
from collections.abc import AsyncIterator, Callable, Collection
from typing import Annotated, Any, Literal, TypeVar

import orjson
from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from app.domain import UserRecord
from app.errors import (
    InvalidRequest,
    UnsupportedMediaType,
)
from app.http.auth import Client
from app.http.dependencies import (
    AdminClient,
    CrawlClient,
    GatewayDep,
    ReadClient,
    RunnerDep,
    log_audit,
)
from app.http.schemas.common import ErrorResponse, is_json, media_type
from app.http.schemas.jobs import (
    CALLBACK_PATTERN,
    CSV_PATTERN,
    MAX_SEQ,
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
from app.http.schemas.users import MAX_AGE_S
from app.jobs import service
from app.jobs.model import FAILED, FOUND, NOT_FOUND, Item, Job, job_view
from app.jobs.runner import JobRunner

router = APIRouter(prefix="/api/jobs", tags=["jobs"])

PAGE = 1000
"""Items read from the store at a time while streaming results."""
INLINE_BODY_BYTES = 64 * 1024
"""Bodies up to this size are parsed on the event loop (a thread costs more than they do)."""
Parsed = TypeVar("Parsed")
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


def view(runner: JobRunner, job: Job, client: Client) -> dict[str, Any]:
    """The job as `client` may see it: where its callback goes, and how the last attempt
    failed, only for the job's own key and admins (an error like "connection refused" from
    an address would tell anyone else what listens there)."""
    shown = job_view(job, runner.eta_s(job))
    if job.owner != client.name and client.role != "admin":
        shown["callback_url"] = None
        if shown["webhook"] is not None:
            shown["webhook"]["last_error"] = None
    return shown


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
    max_age_s: Annotated[float | None, Query(ge=0, le=MAX_AGE_S)] = None,
    callback_url: Annotated[str | None, Query(max_length=2000, pattern=CALLBACK_PATTERN)] = None,
) -> Response:
    """Fetch many ids in the background (`crawl`): `{"user_ids": [...]}` (up to
    JOB_MAX_IDS), `{"id_range": [first, last]}` (first <= last, up to JOB_MAX_RANGE ids:
    rules the schema cannot state, answered 422), or a text/plain or
    text/csv body with one id per line (its options as query parameters). Answers 202 with
    the job and its `Location`; the job runs within Freelancer's minute and hour budget."""
    settings = runner.settings
    body = await request.body()
    kind = media_type(request.headers.get("content-type"))
    ids: list[int] | range
    options: JobOptions
    if is_json(kind):
        options, ids = await off_the_loop(body, parse_json, body, settings)
    elif kind in ("text/plain", "text/csv"):
        try:
            options = JobOptions(
                label=label, priority=priority, max_age_s=max_age_s, callback_url=callback_url
            )
        except ValidationError as exc:
            raise InvalidRequest(f"query: {exc.errors()[0]['msg']}") from None
        ids = await off_the_loop(body, parse_text, body, settings, csv=kind == "text/csv")
    else:
        raise UnsupportedMediaType(
            "send the ids as application/json, text/plain or text/csv (Content-Type), "
            f"not {repr(kind[:60]) if kind else 'none'}"
        )
    job = await service.create(
        runner,
        user_ids=ids,
        owner=client.name,
        priority=options.priority,
        label=options.label,
        max_age_s=options.max_age_s,
        callback_url=options.callback_url,
    )
    log_audit(client, "job_submit", job.total)
    return Response(
        orjson.dumps(view(runner, job, client)),
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
        "jobs": [view(runner, job, client) for job in jobs],
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
    return view(runner, await service.get(runner, job_id=job_id), client)


@router.post(
    "/{job_id}/cancel",
    response_model=JobView,
    responses=ERRORS,
    summary="Cancel a job",
    operation_id="cancel_job",
)
async def cancel_job(job_id: JobId, runner: RunnerDep, client: ReadClient) -> dict[str, Any]:
    """Stop a pending or running job (its own key, or `admin`); what is done stays."""
    job = own(await service.get(runner, job_id=job_id), client)
    job = await service.cancel(runner, job=job)
    log_audit(client, "job_cancel", job.total)
    return view(runner, job, client)


@router.post(
    "/{job_id}/retry-failed",
    status_code=202,
    response_model=JobView,
    responses=ERRORS,
    summary="Retry a job's failed ids",
    operation_id="retry_failed",
)
async def retry_failed(
    job_id: JobId, runner: RunnerDep, client: ReadClient, response: Response
) -> dict[str, Any]:
    """Fetch a finished job's failed ids again (its own key, or `admin`): a completed or
    failed job takes them up itself; a cancelled job's go into a new job with its options
    (the answer and `Location` name the job that fetches them)."""
    job = own(await service.get(runner, job_id=job_id), client)
    job, retried = await service.retry_failed(runner, job=job)
    log_audit(client, "job_retry_failed", retried)
    response.headers["Location"] = f"/api/jobs/{job.job_id}"
    return view(runner, job, client)


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
    deleted = await service.delete(runner, job_id=job_id)
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
    cursor: Annotated[
        int, Query(ge=-1, le=MAX_SEQ, description="next_cursor of the previous page")
    ] = -1,
    limit: Annotated[int, Query(ge=1, le=10_000)] = PAGE,
    include: Literal["missing"] | None = None,
    format: Literal["json", "ndjson", "csv"] | None = None,
) -> Response:
    """The users a job found (`read`), with `include=missing` its `not_found` and `failed`
    ids too: JSON pages by cursor, or the whole job streamed as NDJSON
    (`Accept: application/x-ndjson`) or CSV (`Accept: text/csv` or `format=csv`)."""
    await service.get(runner, job_id=job_id)
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
    render = (
        functools.partial(_csv_page, guard=runner.settings.csv_formula_guard)
        if chosen == "csv"
        else _ndjson_page
    )
    media = "text/csv; charset=utf-8" if chosen == "csv" else "application/x-ndjson"
    name = f"job-{job_id}.{chosen}"
    return StreamingResponse(
        stream(runner, gateway.store, job_id, states, render, header=chosen == "csv"),
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


async def off_the_loop(
    body: bytes, parse: Callable[..., Parsed], *args: Any, **kwargs: Any
) -> Parsed:
    """`parse(*args, **kwargs)`, in a worker thread when `body` is large: a 4 MiB body
    takes a second or more to parse, and the event loop serves every other request."""
    if len(body) <= INLINE_BODY_BYTES:
        return parse(*args, **kwargs)
    return await asyncio.to_thread(parse, *args, **kwargs)


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


def _csv_page(items: list[Item], users: dict[int, UserRecord], *, guard: bool) -> bytes:
    return _csv(result_row(i, users.get(i.user_id), guard=guard) for i in items)


def _csv(rows: Any) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(rows)
    return out.getvalue().encode()
