"""User lookups and cache administration: HTTP in, gateway call, HTTP out."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from starlette.routing import Match, Route
from starlette.types import Scope

from app.dependencies import GatewayDep, get_gateway
from app.errors import UserNotFound, UserUnavailable
from app.gateway.results import TIMEOUT, LookupResult
from app.models import (
    DEFAULT_MAX_IDS,
    MAX_USER_ID,
    ClearExpiredResponse,
    ErrorResponse,
    EvictResponse,
    RevalidateRequest,
    RevalidateResponse,
    User,
    UsersResponse,
    parse_user_ids,
    users_request_schema,
)

router = APIRouter(tags=["users"])


class PlainRoute(Route):
    """A Starlette route that names itself in the scope as FastAPI's do (metrics label by it)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE:
            child["route"] = self
        return match, child


UserIdPath = Annotated[int, Path(ge=1, le=MAX_USER_ID, description="A Freelancer user id")]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 413, 422, 503)
}


async def lookup_users(request: Request) -> Response:
    """Answer up to MAX_USERS_PER_REQUEST ids from the cache, fetching misses once each."""
    gateway = get_gateway(request)
    user_ids = parse_user_ids(await request.body(), max_ids=gateway.settings.max_users_per_request)
    # A batch memory holds whole is answered without awaiting the gateway at all.
    result = gateway.lookup_now(user_ids)
    if not isinstance(result, LookupResult):
        result = await gateway.finish(result)
    return Response(result.to_json(), media_type="application/json")


# The hot path is served by a plain Starlette route, which `create_app` puts before every
# other route; the FastAPI route below only documents it in /docs. In `make bench`,
# FastAPI's per-request machinery (dependency solving, its request wrappers) cost a 50-id
# cached batch more than the gateway's own work did; the body is parsed and checked by
# hand either way, so nothing is lost.
hot_route = PlainRoute("/api/users", lookup_users, methods=["POST"])
router.add_api_route(
    "/api/users",
    lookup_users,
    methods=["POST"],
    response_model=UsersResponse,
    responses=ERRORS,
    summary="Look up a batch of users",
    openapi_extra={"requestBody": users_request_schema(DEFAULT_MAX_IDS)},
)


@router.post(
    "/api/users/revalidate",
    response_model=RevalidateResponse,
    responses=ERRORS,
    status_code=202,
    summary="Queue background refreshes",
)
async def revalidate(body: RevalidateRequest, gateway: GatewayDep) -> RevalidateResponse:
    """Refresh these ids (or every user older than `older_than_s`) in the background."""
    if body.user_ids is not None:
        queued = await gateway.admin.revalidate(list(dict.fromkeys(body.user_ids)))
    else:
        queued = await gateway.admin.revalidate_older_than(body.older_than_s or 0.0)
    return RevalidateResponse(queued=queued)


@router.get(
    "/api/users/{user_id:int}",
    response_model=User,
    responses={**ERRORS, 404: {"model": ErrorResponse}, 504: {"model": ErrorResponse}},
    summary="Look up one user",
)
async def lookup_user(user_id: UserIdPath, gateway: GatewayDep) -> Response:
    """One user: 404 if Freelancer has no such user, 504 if not fetched in time, 503 if failing."""
    result = await gateway.lookup([user_id])
    if result.users:
        return Response(result.user_json(0), media_type="application/json")
    if result.not_found:
        raise UserNotFound(f"Freelancer has no user {user_id}")
    reason = result.errors[str(user_id)]
    if reason == TIMEOUT.reason:
        raise UserUnavailable(
            f"user {user_id} was not fetched within WAIT_TIMEOUT_S; it will be cached when it is",
            reason=reason,
            status_code=504,
        )
    raise UserUnavailable(
        f"user {user_id} is unavailable: Freelancer is failing ({reason})",
        reason=reason,
        status_code=503,
    )


@router.delete(
    "/api/users/{user_id:int}",
    response_model=EvictResponse,
    responses={**ERRORS, 404: {"model": ErrorResponse}},
    summary="Evict one user from every cache",
)
async def evict_user(user_id: UserIdPath, gateway: GatewayDep) -> EvictResponse:
    """Remove a user from the store, the memory cache and the negative caches."""
    return EvictResponse(user_id=user_id, evicted=await gateway.admin.evict(user_id))


@router.post(
    "/api/cache/clear-expired",
    response_model=ClearExpiredResponse,
    responses=ERRORS,
    summary="Remove expired users",
)
async def clear_expired(gateway: GatewayDep) -> ClearExpiredResponse:
    """Delete users fetched longer ago than CACHE_TTL_S + STALE_IF_ERROR_S."""
    return ClearExpiredResponse(removed=await gateway.admin.clear_expired())
