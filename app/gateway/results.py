"""What a lookup answers: each id's outcome, where it came from, and the rendered response."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import orjson

from app.gateway.cache import CachedUser

Source = Literal["cache", "stale", "fetched", "shared"]
"""cache: fresh from memory or the store; stale: past CACHE_TTL_S, a refresh is queued;
fetched: this request started the fetch; shared: it joined a fetch already in flight."""

Reason = Literal["timeout", "upstream_error", "rate_limited", "breaker_open", "auth", "shutdown"]
"""Why an id is unavailable (`not_found` is an answer, not a reason)."""

SOURCES: tuple[Source, ...] = get_args(Source)
REASONS: tuple[Reason, ...] = get_args(Reason)


@dataclass(slots=True, frozen=True)
class Failure:
    """Why an id has no user: `not_found`, or a `Reason` it is unavailable."""

    reason: str
    detail: str


NOT_FOUND = Failure("not_found", "Freelancer has no user with this id")
SHUTDOWN = Failure("shutdown", "the gateway is shutting down")
INTERNAL = Failure("upstream_error", "the fetch failed unexpectedly")
BREAKER_OPEN = Failure("breaker_open", "Freelancer is failing")
RATE_LIMITED = Failure("rate_limited", "waiting for Freelancer's rate limit; try again later")
TIMEOUT = Failure("timeout", "not fetched before the deadline; it will be cached when it is")

Outcome = CachedUser | Failure
"""One id's answer: the cached user, or why there is none."""

_SUFFIX: dict[str, bytes] = {
    source: b',"source":"%s","stale":%s}'
    % (source.encode(), b"true" if source == "stale" else b"false")
    for source in SOURCES
}


@dataclass(slots=True)
class LookupResult:
    """The answer for one request, ids in request order."""

    users: list[tuple[CachedUser, Source]]
    not_found: list[int]
    unavailable: list[int]
    errors: dict[str, str]

    @property
    def user_ids(self) -> list[int]:
        """The ids of the users found, in request order."""
        return [entry[0][0] for entry, _ in self.users]

    def user_json(self, index: int) -> bytes:
        """One user object as JSON."""
        entry, source = self.users[index]
        return entry[1] + _SUFFIX[source]

    def to_json(self) -> bytes:
        """The JSON body of `POST /api/users`, spliced from pre-rendered users."""
        users = b",".join([entry[1] + _SUFFIX[source] for entry, source in self.users])
        rest = orjson.dumps(
            {
                "total_count": len(self.users),
                "not_found": self.not_found,
                "unavailable": self.unavailable,
                "errors": self.errors,
            }
        )
        return b'{"users":[' + users + b"]," + rest[1:]
