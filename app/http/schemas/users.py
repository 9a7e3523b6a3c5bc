"""What the lookup and cache routes take and answer, and the fast parser for user-id lists."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from app.errors import InvalidRequest
from app.gateway.results import Reason, Source
from app.http.schemas.common import kind_of, load_json, one_of, shown

# The largest id accepted: 2^53 - 1. It fits the int64 MongoDB stores, and every JSON client
# (JavaScript's numbers included) holds it exactly, so a schema with this bound cannot be
# misread through float rounding (fuzzers and clients near 2^63 round past the limit).
MAX_USER_ID = 2**53 - 1
DEFAULT_MAX_IDS = 100
MAX_AGE_S = 10 * 365 * 86400
"""The largest age in seconds any parameter takes (ten years): finite, and a float every
store holds."""
_INT = {int}
ID_RULE = "a positive integer up to 2^53 - 1"


def as_user_id(value: Any) -> int:
    """`value` as a user id: an int, or an integral float (JSON's 1079.0), in range.

    ValueError naming the rule otherwise: booleans, strings, 1.5, 0, negatives, > 2^53 - 1.
    """
    number = int(value) if type(value) is float and value.is_integer() else value
    if type(number) is not int or not 0 < number <= MAX_USER_ID:
        raise ValueError(f"must be {ID_RULE}, not {shown(value)}")
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


REVALIDATE_ONE_OF = "give exactly one of user_ids or older_than_s"


class RevalidateRequest(BaseModel):
    """Which users to refresh in the background: a list of ids, or all older than N seconds.

    Exactly one of the two fields.
    """

    model_config = ConfigDict(extra="forbid", json_schema_extra=one_of("user_ids", "older_than_s"))

    user_ids: list[UserId] | None = Field(None, min_length=1, max_length=1000)
    older_than_s: float | None = Field(None, strict=True, ge=0, le=MAX_AGE_S)

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
        unknown = ", ".join(shown(name) for name in data if name != "user_ids")
        plural = "s" if len(data) > 2 else ""
        raise InvalidRequest(f"unknown field{plural} {unknown}: the body takes only user_ids")
    ids = data["user_ids"]
    if not isinstance(ids, list):
        raise InvalidRequest(f"user_ids must be a list of ids, not {kind_of(ids)}")
    if not ids:
        raise InvalidRequest("user_ids must hold at least 1 id", status_code=400)
    if len(ids) > max_ids:
        raise InvalidRequest(
            f"user_ids must hold at most {max_ids} ids (got {len(ids)})", status_code=400
        )
    # One pass in C for the common case; the loop below handles the rest.
    # `type(...) is int` on purpose: JSON `true` is an int to Python, 1079.0 is a float.
    if set(map(type, ids)) == _INT and min(ids) > 0 and max(ids) <= MAX_USER_ID:
        return ids if len(set(ids)) == len(ids) else list(dict.fromkeys(ids))
    # Integral floats (1079.0, an integer to JSON Schema too) are ids; the first id that is
    # not one is named with the rule it breaks.
    checked = []
    for index, uid in enumerate(ids):
        try:
            checked.append(as_user_id(uid))
        except ValueError as exc:
            raise InvalidRequest(f"user_ids[{index}] {exc}") from None
    return list(dict.fromkeys(checked))
