"""What a lookup answers: each id's outcome, where it came from, and the rendered response."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Literal, get_args

import orjson

from app.domain import UserRecord
from app.gateway.cache import CACHE_JOIN, CACHE_TAIL, CachedUser, cache_entry, user_id_of
from app.gateway.stats import GatewayStats

Source = Literal["cache", "stale", "fetched", "shared"]
"""cache: fresh from memory or the store; stale: past CACHE_TTL_S, a refresh is queued;
fetched: this request started the fetch; shared: it joined a fetch already in flight."""

Reason = Literal[
    "timeout", "upstream_error", "rate_limited", "breaker_open", "auth", "shutdown", "quota"
]
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
QUOTA = Failure("quota", "this client is past KEY_MISSES_PER_MIN new ids; cached ids still answer")

Outcome = CachedUser | Failure
"""One id's answer: the cached user, or why there is none."""

_TAIL: dict[str, bytes] = {
    source: b',"source":"%s","stale":%s}'
    % (source.encode(), b"true" if source == "stale" else b"false")
    for source in SOURCES
}
_NOTHING_MISSING = b'"not_found":[],"unavailable":[],"errors":{}}'
_JSON = itemgetter(0)


def _user_json(entry: CachedUser, source: Source) -> bytes:
    return entry[0] + _TAIL[source]


@dataclass(slots=True)
class LookupResult:
    """The answer for one request, ids in request order.

    `sources` is None when every user came fresh from the cache: the common case, whose
    body is one `join` of pre-rendered users.
    """

    users: Sequence[CachedUser]
    sources: list[Source] | None = None
    not_found: list[int] = field(default_factory=list)
    unavailable: list[int] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def user_ids(self) -> list[int]:
        """The ids of the users found, in request order."""
        return [user_id_of(entry) for entry in self.users]

    def user_json(self, index: int) -> bytes:
        """One user object as JSON."""
        source = "cache" if self.sources is None else self.sources[index]
        return _user_json(self.users[index], source)

    def to_json(self) -> bytes:
        """The JSON body of `POST /api/users`, spliced from pre-rendered users."""
        if self.sources is None:
            # The users' JSON lacks its closing brace: the fresh hits' tail goes in the join.
            users = CACHE_JOIN.join(map(_JSON, self.users))
            tail = CACHE_TAIL if self.users else b""
        else:
            users = b",".join(map(_user_json, self.users, self.sources))
            tail = b""
        head = b'{"users":[%b%b],"total_count":%d,' % (users, tail, len(self.users))
        if not (self.not_found or self.unavailable):
            return head + _NOTHING_MISSING
        rest = orjson.dumps(
            {"not_found": self.not_found, "unavailable": self.unavailable, "errors": self.errors}
        )
        return head + rest[1:]


def render(
    user_ids: Sequence[int], answers: Mapping[int, tuple[Source, Outcome]], stats: GatewayStats
) -> LookupResult:
    """The result of a lookup from each id's answer, counting hits, misses and reasons."""
    users: list[CachedUser] = []
    sources: list[Source] = []
    result = LookupResult(users, sources)
    for uid in user_ids:
        source, outcome = answers[uid]
        if not isinstance(outcome, Failure):
            users.append(outcome)
            sources.append(source)
            if source == "stale":
                stats.stale_hits += 1
        elif outcome.reason == "not_found":
            result.not_found.append(uid)
            stats.not_found += 1
            if source == "cache":
                stats.negative_hits += 1
        else:
            result.unavailable.append(uid)
            result.errors[str(uid)] = outcome.reason
            stats.unavailable += 1
            stats.unavailable_reasons[outcome.reason] += 1
    hits = sources.count("cache")
    stats.cache_hits += hits
    if hits == len(sources):
        result.sources = None  # every user fresh from the cache: one join, as in the hot path
    return result


def batch_outcomes(
    ids: Sequence[int], found: Mapping[int, UserRecord], previous: Mapping[int, UserRecord | None]
) -> tuple[dict[int, Outcome], list[UserRecord], list[int]]:
    """Each id's outcome of one upstream answer, the records to save, and cached ids now gone.

    A refreshed user keeps the `created_at` of its previous copy.
    """
    outcomes: dict[int, Outcome] = {}
    records: list[UserRecord] = []
    gone: list[int] = []
    for uid in ids:
        record = found.get(uid)
        before = previous.get(uid)
        if record is None:
            outcomes[uid] = NOT_FOUND
            if before is not None:
                gone.append(uid)
            continue
        if before is not None:
            record = record._replace(created_at=before.created_at)
        records.append(record)
        outcomes[uid] = cache_entry(record)
    return outcomes, records, gone
