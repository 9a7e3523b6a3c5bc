"""Dependencies the routers declare, as `Annotated` aliases over the lifespan's state."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Annotated

from fastapi import Depends, Request

from app.errors import ShuttingDown
from app.gateway import Gateway, LookupResult
from app.gateway.flight import PendingLookup
from app.http.auth import Client, Role
from app.http.client_limits import ClientLimits
from app.http.schemas.common import require_json
from app.http.state import Services, services_of
from app.jobs.runner import JobRunner

audit = logging.getLogger("app.audit")


def get_services(request: Request) -> Services:
    """The app's parts (`app.http.state`)."""
    return services_of(request.app)


def get_gateway(request: Request) -> Gateway:
    """The running gateway; 503 outside the lifespan."""
    gateway = services_of(request.app).gateway
    if gateway is None:
        raise ShuttingDown("the gateway is not running")
    return gateway


def get_runner(request: Request) -> JobRunner:
    """The running job runner; 503 outside the lifespan."""
    runner = services_of(request.app).runner
    if runner is None:
        raise ShuttingDown("the gateway is not running")
    return runner


def get_client(request: Request) -> Client:
    """Who is calling, as the middleware identified them (every /api/ path is identified)."""
    client: Client = request.scope["gateway.client"]
    return client


def require(role: Role) -> Callable[[Request], Client]:
    """A dependency: the caller, if their key has `role` (or a higher one); else 403."""

    def check(request: Request) -> Client:
        return get_client(request).require(role)

    return check


async def lookup_for_client(
    request: Request, gateway: Gateway, user_ids: Sequence[int]
) -> LookupResult:
    """A lookup counted against the caller's ids a minute and new ids a minute."""
    client = get_client(request)
    limits = services_of(request.app).limits
    result = start_lookup(limits, client, gateway, user_ids)
    if isinstance(result, LookupResult):
        return result
    return await finish_lookup(limits, client, gateway, result)


def start_lookup(
    limits: ClientLimits, client: Client, gateway: Gateway, user_ids: Sequence[int]
) -> LookupResult | PendingLookup:
    """Count the ids against the client's ids a minute (429 past it), then look them up:
    the answer when memory holds the batch whole (in one step, no await), else what
    `finish_lookup` completes. The fast path (`app.http.fast_path`) and the route share it."""
    limits.admit_ids(client, len(user_ids))
    return gateway.lookup_now(user_ids)


async def finish_lookup(
    limits: ClientLimits, client: Client, gateway: Gateway, lookup: PendingLookup
) -> LookupResult:
    """Complete a lookup memory did not answer, its new ids taken from the client's quota."""
    # The gateway decides which ids are new with no await, and takes them from the
    # client's quota there: parallel lookups of one client cannot each see the same room.
    reservation = limits.reserve_misses(client)
    lookup.allow_misses = reservation.take
    try:
        return await gateway.finish(lookup)
    finally:
        reservation.settle(fetched_here=lookup.fetched_here)


def log_audit(client: Client, action: str, size: int) -> None:
    """One audit line for a call that spends budget in bulk or changes the cache."""
    audit.info(
        "%s by %s (%d)",
        action,
        client.name,
        size,
        extra={"key": client.name, "action": action, "size": size},
    )


def json_body(request: Request) -> None:
    """415 unless the request declares a JSON body (see `require_json`)."""
    require_json(request.headers.get("content-type"))


JSON_BODY = Depends(json_body)
"""For the `dependencies` of a route that takes a JSON body."""
ServicesDep = Annotated[Services, Depends(get_services)]
GatewayDep = Annotated[Gateway, Depends(get_gateway)]
RunnerDep = Annotated[JobRunner, Depends(get_runner)]
ReadClient = Annotated[Client, Depends(require("read"))]
CrawlClient = Annotated[Client, Depends(require("crawl"))]
AdminClient = Annotated[Client, Depends(require("admin"))]
