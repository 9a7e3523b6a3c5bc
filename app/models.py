"""Request and response schemas (what `/docs` shows), and the fast parser for user-id lists."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from app.errors import InvalidRequest
from app.gateway.results import Reason, Source

# The largest id accepted: 2^53 - 1. It fits the int64 MongoDB stores, and every JSON client
# (JavaScript's numbers included) holds it exactly, so a schema with this bound cannot be
# misread through float rounding (fuzzers and clients near 2^63 round past the limit).
MAX_USER_ID = 2**53 - 1
DEFAULT_MAX_IDS = 100
_INT = {int}
ID_RULE = "a positive integer up to 2^53 - 1"


def as_user_id(value: Any) -> int:
    """`value` as a user id: an int, or an integral float (JSON's 1079.0), in range.

    ValueError naming the rule otherwise: booleans, strings, 1.5, 0, negatives, > 2^53 - 1.
    """
    number = int(value) if type(value) is float and value.is_integer() else value
    if type(number) is not int or not 0 < number <= MAX_USER_ID:
        raise ValueError(f"must be {ID_RULE}, not {_show(value)}")
    return number


def path_user_id(value: Any) -> int:
    """A user id from a URL path segment: ASCII digits only (no sign, no point), in range."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 16:
        number = int(value)
        if 0 < number <= MAX_USER_ID:
            return number
    shown = repr(value) if isinstance(value, str) and len(value) <= 40 else "that"
    raise ValueError(f"must be {ID_RULE}, not {shown}")


# The JSON Schema (`integer`, 1 to 2^53 - 1) comes from Field; the check is `as_user_id`'s,
# which also takes 1079.0, an integer to JSON Schema as well.
UserId = Annotated[
    int,
    Field(strict=True, ge=1, le=MAX_USER_ID, examples=[1001]),
    BeforeValidator(as_user_id),
]


class UsersRequest(BaseModel):
    """A batch of Freelancer user ids; duplicates are folded."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"user_ids": [1001, 1002, 97]}]}
    )

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


REVALIDATE_ONE_OF = "give exactly one of user_ids or older_than_s"


def one_of(*names: str) -> Callable[[dict[str, Any]], None]:
    """A schema hook saying "exactly one of `names`": `oneOf`, each alternative closed and
    holding the other fields too. The alternatives' fields are optional only in that one of
    them is given; none takes null."""

    def hook(schema: dict[str, Any]) -> None:
        properties = schema["properties"]
        for name in names:
            prop = properties[name]
            branches = [b for b in prop.pop("anyOf", []) if b.get("type") != "null"]
            prop.pop("default", None)
            if branches:
                prop.update(branches[0])
        shared = {k: v for k, v in properties.items() if k not in names}
        schema["oneOf"] = [
            {
                "type": "object",
                "properties": {name: properties[name], **shared},
                "required": [name],
                "additionalProperties": False,
            }
            for name in names
        ]

    return hook


class RevalidateRequest(BaseModel):
    """Which users to refresh in the background: a list of ids, or all older than N seconds.

    Exactly one of the two fields.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra=one_of("user_ids", "older_than_s"))

    user_ids: list[UserId] | None = Field(None, min_length=1, max_length=1000)
    older_than_s: float | None = Field(None, strict=True, ge=0, le=10 * 365 * 86400)

    @model_validator(mode="before")
    @classmethod
    def _one_given(cls, data: Any) -> Any:
        # Counted by key, before defaults: {"user_ids": null, "older_than_s": 5} is both.
        # Unknown keys pass on, to be named by `extra="forbid"`.
        if (
            isinstance(data, dict)
            and data.keys() <= {"user_ids", "older_than_s"}
            and len(data) != 1
        ):
            raise ValueError(REVALIDATE_ONE_OF)
        return data

    @model_validator(mode="after")
    def _not_null(self) -> RevalidateRequest:
        if self.user_ids is None and self.older_than_s is None:
            raise ValueError(REVALIDATE_ONE_OF)
        return self


class RevalidateResponse(BaseModel):
    queued: int = Field(description="Refreshes queued now (ids already in flight are skipped)")


class EvictResponse(BaseModel):
    user_id: int
    evicted: bool = Field(description="False when the gateway did not know the id")


class ClearExpiredResponse(BaseModel):
    removed: int = Field(description="Users removed from the store")


class BudgetWindow(BaseModel):
    """One of Freelancer's limits, from the log of calls (every process's): calls allowed
    per period, used in the last period, left, and when a client's miss may call next."""

    name: str = Field(examples=["minute"])
    limit: int
    period_s: float
    used: int = Field(description="Calls in the last period_s")
    remaining: int = Field(description="limit - used")
    next_call_in_s: float = Field(description="Seconds until a client's miss may call (0: now)")


class JobStats(BaseModel):
    """Crawl jobs: how many in each status, and what the runner did since start."""

    by_status: dict[str, int]
    ids_done: int = Field(description="Job ids this process recorded as done since start")
    upstream_calls: int = Field(description="Upstream calls job ids went out in")
    running_here: bool = Field(description="This process runs the deployment's jobs")


class Health(BaseModel):
    message: str = "Freelancer user-info gateway is running"
    status: Literal["healthy", "degraded"]
    problems: list[str]
    queue_size: int
    processing_count: int
    store: Literal["sqlite", "mongodb"]
    upstream: Literal["freelancer", "simulator"]
    upstream_state: Literal["ok", "throttled", "open"]
    auth: Literal["open", "keys"] = Field(
        description="open: no API_KEYS, anyone who can reach the service may call it"
    )
    coordination: Literal["local", "redis"] = Field(
        description="redis: the processes of the deployment share fetches, budget and cache"
    )
    processes: int = Field(description="Processes of the deployment seen alive lately")
    budget: list[BudgetWindow] = Field(description="Freelancer's minute and hour windows")


class QueueInfo(BaseModel):
    queue_size: int
    processing_count: int
    currently_processing: list[int] = Field(description="Ids in flight (at most 1000 listed)")
    queue_limit: int


class KeyUsage(BaseModel):
    """What one client did since start, by its key's name (the IP address when open)."""

    name: str
    requests: int
    ids: int
    misses: int = Field(description="New ids it sent to Freelancer")
    refused: int = Field(description="Requests answered 429")
    over_quota: int = Field(description="New ids answered unavailable, reason quota")


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
    batches: int
    job_batches: int
    refreshes_queued: int
    shed: int
    store_errors: int
    store_save_failures: int
    worker_restarts: int
    keys: list[KeyUsage] = Field(description="Usage per client")
    budget: list[BudgetWindow] = Field(description="Freelancer's minute and hour windows")
    jobs: JobStats | None = Field(description="Crawl jobs; null while the runner is down")


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
    data = load_json(body, status_code=400)
    if not isinstance(data, dict) or "user_ids" not in data:
        raise InvalidRequest('the body must be a JSON object like {"user_ids": [1, 2, 3]}')
    if len(data) != 1:
        unknown = ", ".join(_show(name) for name in data if name != "user_ids")
        plural = "s" if len(data) > 2 else ""
        raise InvalidRequest(f"unknown field{plural} {unknown}: the body takes only user_ids")
    ids = data["user_ids"]
    if not isinstance(ids, list):
        raise InvalidRequest(f"user_ids must be a list of ids, not {_kind(ids)}")
    if not ids:
        raise InvalidRequest("user_ids must hold at least 1 id", status_code=400)
    if len(ids) > max_ids:
        raise InvalidRequest(
            f"user_ids must hold at most {max_ids} ids (got {len(ids)})", status_code=400
        )
    # One pass in C for the common case; the loop below handles the rest.
    # `type(...) is int` on purpose: JSON `true` is an int to Python, 1079.0 is a float.
    if set(map(type, ids)) == _INT and min(ids) > 0 and max(ids) <= MAX_USER_ID:
        return list(dict.fromkeys(ids))
    # Integral floats (1079.0, an integer to JSON Schema too) are ids; the first id that is
    # not one is named with the rule it breaks.
    checked = []
    for index, uid in enumerate(ids):
        try:
            checked.append(as_user_id(uid))
        except ValueError as exc:
            raise InvalidRequest(f"user_ids[{index}] {exc}") from None
    return list(dict.fromkeys(checked))


def load_json(body: bytes, *, status_code: int) -> Any:
    """The parsed body; InvalidRequest with `status_code` when it is not JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    # orjson refuses integers beyond 64 bits; the stdlib parses them so we can say
    # "too large" instead of "not JSON".
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest("the body is not valid JSON", status_code=status_code) from exc


def _kind(value: Any) -> str:
    return {dict: "an object", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
