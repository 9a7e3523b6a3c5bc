"""User lookups, and the deprecated cache-administration paths: HTTP in, gateway, HTTP out.

The old paths are kept for one release; their successors live in `app.http.routers.cache`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from starlette.routing import Match, Route
from starlette.types import Message, Receive, Scope, Send

from app.errors import UserNotFound, UserUnavailable
from app.gateway.results import QUOTA, TIMEOUT
from app.http.dependencies import (
    JSON_BODY,
    AdminClient,
    CrawlClient,
    GatewayDep,
    get_gateway,
    lookup_for_client,
)
from app.http.routers import cache
from app.http.routers.cache import ERRORS, EVICT_LINKS, UserIdPath
from app.http.schemas.common import ErrorResponse, require_json
from app.http.schemas.users import (
    DEFAULT_MAX_IDS,
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


class DeprecatedRoute(APIRoute):
    """A route kept for one release: every answer, errors included, carries `Deprecation:
    true` and a `Link` to its successor (`successor` with the path parameters filled in)."""

    successor = ""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = {k: quote(str(v), safe="") for k, v in scope.get("path_params", {}).items()}
        link = f'<{self.successor.format(**params)}>; rel="successor-version"'.encode()

        async def send_deprecated(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), (b"deprecation", b"true")]
                message = {**message, "headers": [*headers, (b"link", link)]}
            await send(message)

        await super().handle(scope, receive, send_deprecated)


def deprecated_for(successor: str, base: type[APIRoute] = APIRoute) -> type[APIRoute]:
    """A `DeprecatedRoute` (and `base`) class whose answers link to `successor`, a path
    template."""
    return type("DeprecatedRoute", (DeprecatedRoute, base), {"successor": successor})


class UserIdRoute(APIRoute):
    """A route on `/api/users/{user_id}` that leaves the sibling `/api/users/revalidate` to
    its own route, so that path's 405 names only POST in `Allow`. Any other segment is the
    route's: a malformed id gets the 422 that names the rule, not a 404."""

    SIBLINGS = frozenset({"revalidate"})

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE and child["path_params"].get("user_id") in self.SIBLINGS:
            return Match.NONE, {}
        return match, child


def deprecation_headers(successor: str) -> dict[str, Any]:
    """The OpenAPI description of the headers a deprecated route answers with."""
    return {
        "Deprecation": {
            "description": "Always `true`: this path is deprecated and will be removed",
            "schema": {"type": "string", "enum": ["true"]},
        },
        "Link": {
            "description": f'`<{successor}>; rel="successor-version"`: the path to use instead',
            "schema": {"type": "string"},
        },
    }


LOOKUP_LINKS = {
    "GetUser": {
        "operationId": "lookup_user",
        "parameters": {"user_id": "$response.body#/users/0/user_id"},
        "description": "The first user of the answer, on its own.",
    },
    "EvictUser": {
        "operationId": "evict_user",
        "parameters": {"user_id": "$response.body#/users/0/user_id"},
        "description": "Evict the first user of the answer from every cache.",
    },
}


async def lookup_users(request: Request) -> Response:
    """Answer up to MAX_USERS_PER_REQUEST ids from the cache, fetching misses once each."""
    gateway = get_gateway(request)
    require_json(request.headers.get("content-type"))
    user_ids = parse_user_ids(await request.body(), max_ids=gateway.settings.max_users_per_request)
    result = await lookup_for_client(request, gateway, user_ids)
    return Response(result.to_json(), media_type="application/json")


# A valid lookup is answered by `app.http.fast_path` before routing (unless
# `create_app(fast_path=False)`). What it leaves (a body it would refuse) reaches this
# plain Starlette route, which `create_app` puts before every other route: FastAPI's
# per-request machinery cost a 50-id cached batch more than the gateway's own work did in
# `make bench`. The FastAPI route below only documents the path in /docs.
hot_route = PlainRoute("/api/users", lookup_users, methods=["POST"])
router.add_api_route(
    "/api/users",
    lookup_users,
    methods=["POST"],
    response_model=UsersResponse,
    responses={**ERRORS, 200: {"links": LOOKUP_LINKS}},
    summary="Look up a batch of users",
    operation_id="lookup_users",
    openapi_extra={"requestBody": users_request_schema(DEFAULT_MAX_IDS)},
)


async def revalidate(
    body: RevalidateRequest, gateway: GatewayDep, client: CrawlClient
) -> RevalidateResponse:
    """Deprecated: use `POST /api/cache/revalidate`, which this answers as (`crawl`)."""
    return await cache.revalidate(body, gateway, client)


router.add_api_route(
    "/api/users/revalidate",
    revalidate,
    methods=["POST"],
    response_model=RevalidateResponse,
    responses={**ERRORS, 202: {"headers": deprecation_headers("/api/cache/revalidate")}},
    status_code=202,
    summary="Queue background refreshes (deprecated: POST /api/cache/revalidate)",
    dependencies=[JSON_BODY],
    operation_id="revalidate_deprecated",
    deprecated=True,
    route_class_override=deprecated_for("/api/cache/revalidate"),
)


async def lookup_user(request: Request, user_id: UserIdPath, gateway: GatewayDep) -> Response:
    """One user: 404 if Freelancer has no such user, 504 if not fetched in time, 503 if failing."""
    result = await lookup_for_client(request, gateway, [user_id])
    if result.users:
        return Response(result.user_json(0), media_type="application/json")
    if result.not_found:
        raise UserNotFound(f"Freelancer has no user {user_id}")
    reason = result.errors[str(user_id)]
    if reason == QUOTA.reason:
        raise UserUnavailable(
            f"user {user_id} is not cached, and this client is past KEY_MISSES_PER_MIN new ids "
            "a minute; retry later",
            reason=reason,
            status_code=429,
        )
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


router.add_api_route(
    "/api/users/{user_id}",
    lookup_user,
    methods=["GET"],
    response_model=User,
    responses={
        **ERRORS,
        200: {"links": {"EvictUser": {**EVICT_LINKS["GetUser"], "operationId": "evict_user"}}},
        404: {"model": ErrorResponse},
        504: {"model": ErrorResponse},
    },
    summary="Look up one user",
    operation_id="lookup_user",
    route_class_override=UserIdRoute,
)


async def evict_user(
    user_id: UserIdPath, gateway: GatewayDep, client: AdminClient
) -> EvictResponse:
    """Deprecated: use `DELETE /api/cache/users/{user_id}`, which this answers as (`admin`)."""
    return await cache.evict(user_id, gateway, client)


router.add_api_route(
    "/api/users/{user_id}",
    evict_user,
    methods=["DELETE"],
    response_model=EvictResponse,
    responses={**ERRORS, 200: {"headers": deprecation_headers("/api/cache/users/{user_id}")}},
    summary="Evict one user (deprecated: DELETE /api/cache/users/{user_id})",
    operation_id="evict_user_deprecated",
    deprecated=True,
    route_class_override=deprecated_for("/api/cache/users/{user_id}", UserIdRoute),
)
