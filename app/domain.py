"""The user record every layer shares: parsed upstream, kept in the store, served by the gateway."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple

import orjson

StoredUser = tuple[bytes, float]
"""A cached user as a hit needs it: its JSON object (`UserRecord.rendered()`) and when it
was fetched. What the stores answer a lookup with: no record is built, nothing rendered."""


class UserRecord(NamedTuple):
    """One Freelancer user as the gateway caches it. Times are Unix seconds (UTC).

    What the gateway serves is the record rendered once (`rendered()`); a record is built
    from that JSON again (`from_public`) only where code needs its fields.
    """

    user_id: int
    username: str
    display_name: str | None = None
    country: str | None = None
    city: str | None = None
    role: str | None = None
    registration_date: float | None = None
    avatar_url: str | None = None
    created_at: float = 0.0
    """When the gateway first cached this user; kept across refreshes."""
    fetched_at: float = 0.0
    """When Freelancer last answered for this user; drives freshness."""

    def public(self) -> dict[str, Any]:
        """The user as clients see it, without the per-request `source`/`stale` fields."""
        return {
            "user_id": self.user_id,
            "username": self.username,
            "display_name": self.display_name,
            "country": self.country,
            "city": self.city,
            "role": self.role,
            "registration_date": iso(self.registration_date),
            "avatar_url": self.avatar_url,
            "created_at": iso(self.created_at),
            "fetched_at": iso(self.fetched_at),
        }

    def rendered(self) -> bytes:
        """`public()` as a JSON object: the bytes every answer about this user is made of,
        kept beside the fields in the store."""
        return orjson.dumps(self.public())

    @classmethod
    def from_public(cls, data: Mapping[str, Any], *, fetched_at: float) -> UserRecord:
        """The record `public()` rendered, read back; its times are whole seconds (what
        the JSON shows), but for `fetched_at`, which is given exactly."""
        return cls(
            user_id=int(data["user_id"]),
            username=data["username"],
            display_name=data["display_name"],
            country=data["country"],
            city=data["city"],
            role=data["role"],
            registration_date=parse_iso(data["registration_date"]),
            avatar_url=data["avatar_url"],
            created_at=parse_iso(data["created_at"]) or 0.0,
            fetched_at=fetched_at,
        )


def iso(ts: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC (`2024-01-02T03:04:05Z`), or None.

    Truncated to the whole second below (floor), which the stores can compute too:
    whether two times show as the same second decides whether a stored JSON is current.
    """
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def parse_iso(text: str | None) -> float | None:
    """What `iso` rendered, as Unix seconds."""
    return None if text is None else datetime.fromisoformat(text).timestamp()


def second_of(ts: float) -> int:
    """The whole second `iso` shows for `ts`."""
    return int(ts // 1)
