"""Cache administration: evict one user, queue background refreshes, drop expired users.

Roles (app.http.auth): revalidation needs `crawl`, eviction and clearing need `admin`; each
call leaves an audit line naming the key.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BeforeValidator

from app.http.auth import Client
from app.http.dependencies import JSON_BODY, AdminClient, CrawlClient, GatewayDep, log_audit
from app.http.schemas.common import ErrorResponse
from app.http.schemas.users import (
    MAX_USER_ID,
    ClearExpiredResponse,
    EvictResponse,
    RevalidateRequest,
    RevalidateResponse,
    path_user_id,
)

router = APIRouter(tags=["cache"])

# No `:int` converter: every malformed id (`abc`, `-5`, `1.5`, too large) reaches the route
# and gets the same 422 naming the rule, rather than a 404 from routing.
UserIdPath = Annotated[
    int,
    Path(ge=1, le=MAX_USER_ID, description="A Freelancer user id: 1 to 2^53 - 1"),
    BeforeValidator(path_user_id),
]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 503)
}
EVICT_LINKS = {
    "GetUser": {
        "operationId": "lookup_user",
        "parameters": {"user_id": "$response.body#/user_id"},
        "description": "Look the evicted user up again: it is fetched from Freelancer anew.",
    }
}


async def evict(user_id: int, gateway: GatewayDep, client: Client) -> EvictResponse:
    """Remove a user from the store, the memory cache and the negative caches."""
    evicted = await gateway.admin.evict(user_id)
    log_audit(client, "evict", 1)
    return EvictResponse(user_id=user_id, evicted=evicted)


async def revalidate(
    body: RevalidateRequest, gateway: GatewayDep, client: Client
) -> RevalidateResponse:
    """Refresh these ids (or every user older than `older_than_s`) in the background."""
    if body.user_ids is not None:
        user_ids = list(dict.fromkeys(body.user_ids))
        queued = await gateway.admin.revalidate(user_ids)
        log_audit(client, "revalidate", len(user_ids))
    else:
        queued = await gateway.admin.revalidate_older_than(body.older_than_s or 0.0)
        log_audit(client, "revalidate_older_than", queued)
    return RevalidateResponse(queued=queued)


@router.delete(
    "/api/cache/users/{user_id}",
    response_model=EvictResponse,
    responses={**ERRORS, 200: {"links": EVICT_LINKS}},
    summary="Evict one user from every cache",
    operation_id="evict_user",
)
async def evict_user(
    user_id: UserIdPath, gateway: GatewayDep, client: AdminClient
) -> EvictResponse:
    """Remove a user from the store, the memory cache and the negative caches (`admin`).

    The next lookup fetches the user from Freelancer again.
    """
    return await evict(user_id, gateway, client)


@router.post(
    "/api/cache/revalidate",
    response_model=RevalidateResponse,
    responses=ERRORS,
    status_code=202,
    summary="Queue background refreshes",
    operation_id="revalidate",
    dependencies=[JSON_BODY],
)
async def revalidate_users(
    body: RevalidateRequest, gateway: GatewayDep, client: CrawlClient
) -> RevalidateResponse:
    """Refresh these ids (or every user older than `older_than_s`) in the background
    (`crawl`)."""
    return await revalidate(body, gateway, client)


@router.post(
    "/api/cache/clear-expired",
    response_model=ClearExpiredResponse,
    responses=ERRORS,
    summary="Remove expired users",
    operation_id="clear_expired",
)
async def clear_expired(gateway: GatewayDep, client: AdminClient) -> ClearExpiredResponse:
    """Delete users fetched longer ago than CACHE_TTL_S + STALE_IF_ERROR_S (`admin`)."""
    removed = await gateway.admin.clear_expired()
    log_audit(client, "clear_expired", removed)
    return ClearExpiredResponse(removed=removed)
