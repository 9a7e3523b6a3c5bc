"""Request and response schemas (what `/docs` shows), and the fast parser for user-id lists."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.errors import InvalidRequest
from app.gateway.results import Reason, Source

# The largest id accepted: 2^53 - 1. It fits the int64 MongoDB stores, and every JSON client
# (JavaScript's numbers included) holds it exactly, so a schema with this bound cannot be
# misread through float rounding (fuzzers and clients near 2^63 round past the limit).
MAX_USER_ID = 2**53 - 1
DEFAULT_MAX_IDS = 100
_INT = {int}

UserId = Annotated[int, Field(strict=True, ge=1, le=MAX_USER_ID, examples=[1001])]


class UsersRequest(BaseModel):
    """A batch of Freelancer user ids; duplicates are folded."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"user_ids": [1001, 1002, 97]}]})

    user_ids: list[UserId] = Field(min_length=1, max_length=DEFAULT_MAX_IDS)


class User(BaseModel):
    """A Freelancer user as the gateway serves it."""

    user_id: int
    username: str
    display_name: str | None
    country: str | None
    city: str | None
    role: str | None
    registration_date: str | None = Field(description="ISO 8601 UTC, from Freelancer")
    avatar_url: str | None = Field(description="Always https")
    created_at: str = Field(description="When the gateway first cached the user, ISO 8601 UTC")
    fetched_at: str = Field(description="When Freelancer last answered for the user")
    source: Source = Field(
        description="cache: from the cache; stale: past CACHE_TTL_S, a refresh is queued; "
        "fetched: fetched for this request; shared: joined a fetch another request started"
    )
    stale: bool


class UsersResponse(BaseModel):
    """Users in request order, and what could not be answered."""

    users: list[User]
    total_count: int = Field(description="How many users are in `users`")
    not_found: list[int] = Field(description="Ids Freelancer says do not exist")
    unavailable: list[int] = Field(
        description="Ids not fetched in time or while Freelancer fails; retry later"
    )
    errors: dict[str, Reason] = Field(description="Why each unavailable id is unavailable")


class ErrorResponse(BaseModel):
    """Every error the API returns."""

    error: str = Field(examples=["invalid_request"])
    detail: str = Field(examples=["user_ids must hold at most 100 ids (got 250)"])
    reason: Reason | None = None


class RevalidateRequest(BaseModel):
    """Which users to refresh in the background: a list of ids, or all older than N seconds."""

    model_config = ConfigDict(extra="forbid")

    user_ids: list[UserId] | None = Field(None, min_length=1, max_length=1000)
    older_than_s: float | None = Field(None, strict=True, ge=0, le=10 * 365 * 86400)

    @model_validator(mode="after")
    def _exactly_one(self) -> RevalidateRequest:
        if (self.user_ids is None) == (self.older_than_s is None):
            raise ValueError("give exactly one of user_ids or older_than_s")
        return self


class RevalidateResponse(BaseModel):
    queued: int = Field(description="Refreshes queued now (ids already in flight are skipped)")


class EvictResponse(BaseModel):
    user_id: int
    evicted: bool = Field(description="False when the gateway did not know the id")


class ClearExpiredResponse(BaseModel):
    removed: int = Field(description="Users removed from the store")


class Health(BaseModel):
    message: str = "User Info API with Queue is running"
    status: Literal["healthy", "degraded"]
    problems: list[str]
    queue_size: int
    processing_count: int
    store: Literal["sqlite", "mongodb"]
    upstream: Literal["freelancer", "simulator"]
    upstream_state: Literal["ok", "throttled", "open"]


class QueueInfo(BaseModel):
    queue_size: int
    processing_count: int
    currently_processing: list[int] = Field(description="Ids in flight (at most 1000 listed)")
    queue_limit: int


class Stats(BaseModel):
    """Counters since start, and the cache's size."""

    store: Literal["sqlite", "mongodb"]
    total_users_cached: int | None = Field(description="Users in the store; null if unreachable")
    memory_cache_size: int
    queue_size: int
    processing_count: int
    upstream_state: Literal["ok", "throttled", "open"]
    requests: int
    ids_requested: int
    cache_hits: int
    stale_hits: int
    cache_misses: int
    fetched: int
    coalesced: int
    not_found: int
    negative_hits: int
    unavailable: int
    unavailable_reasons: dict[str, int]
    upstream_calls: int
    upstream_users_fetched: int
    upstream_ids_requested: int
    upstream_errors: int
    upstream_retries: int
    refreshes_queued: int
    shed: int
    store_errors: int
    store_save_failures: int
    worker_restarts: int


def users_request_schema(max_ids: int) -> dict[str, Any]:
    """The OpenAPI request body of `POST /api/users`, with the configured maximum."""
    schema = UsersRequest.model_json_schema()
    schema["properties"]["user_ids"]["maxItems"] = max_ids
    return {
        "required": True,
        "content": {"application/json": {"schema": schema}},
    }


def parse_user_ids(body: bytes, *, max_ids: int) -> list[int]:
    """The distinct ids of a `{"user_ids": [...]}` body, in order; InvalidRequest if it is not one.

    Hand-written rather than a pydantic model: it runs on every request, and it gives
    400 for an empty or oversized list as the API promises.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = _loads_slow(body)
    if not isinstance(data, dict) or "user_ids" not in data:
        raise InvalidRequest('the body must be a JSON object like {"user_ids": [1, 2, 3]}')
    ids = data["user_ids"]
    if not isinstance(ids, list):
        raise InvalidRequest(f"user_ids must be a list of ids, not {_kind(ids)}")
    if not ids:
        raise InvalidRequest("user_ids must hold at least 1 id", status_code=400)
    if len(ids) > max_ids:
        raise InvalidRequest(
            f"user_ids must hold at most {max_ids} ids (got {len(ids)})", status_code=400
        )
    # One pass in C for the common case; the loop below only finds what to complain about.
    # `type(...) is int` on purpose: JSON `true` is an int to Python, 1.0 is a float.
    if set(map(type, ids)) == _INT and min(ids) > 0 and max(ids) <= MAX_USER_ID:
        return list(dict.fromkeys(ids))
    for index, uid in enumerate(ids):
        if type(uid) is not int or not 0 < uid <= MAX_USER_ID:
            raise InvalidRequest(
                f"user_ids[{index}] must be a positive integer up to 2^53 - 1, not {_show(uid)}"
            )
    raise AssertionError("unreachable: some id failed the check above")


def _loads_slow(body: bytes) -> Any:
    # orjson refuses integers beyond 64 bits; the stdlib parses them so we can say
    # "too large" instead of "not JSON".
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest("the body is not valid JSON", status_code=400) from exc


def _kind(value: Any) -> str:
    return {dict: "an object", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
