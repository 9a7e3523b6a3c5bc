"""Bounded in-memory maps: the LRU of users in front of the store, and expiring id sets."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Generic, TypeVar

import orjson

from app.domain import UserRecord

V = TypeVar("V")


CachedUser = tuple[bytes, float, tuple[Any, ...]]
"""A user held in memory: its JSON object rendered once, when it was fetched, and the
record's fields. The JSON ends with the commonest answer's `"source":"cache","stale":false}`
so a batch of fresh hits is one `join`; other sources swap that tail (`CACHE_TAIL`) for
their own. `fetched_at` sits in the entry itself: a fresh hit reads nothing else but its
JSON (each object touched is a likely cache miss when 100 000 users are held).

Exact tuples of strings, numbers and bytes on purpose: Python's cyclic GC untracks them,
so 100 000 cached users add nothing to the full collections that otherwise stall every
request (p99 120 ms -> 10 ms in `make bench`). A dataclass, a NamedTuple or a dict inside
would keep each entry tracked.
"""

CACHE_TAIL = b',"source":"cache","stale":false}'


def cache_entry(record: UserRecord) -> CachedUser:
    """The in-memory form of a record."""
    return (orjson.dumps(record.public())[:-1] + CACHE_TAIL, record.fetched_at, tuple(record))


def fetched_at(entry: CachedUser) -> float:
    """When Freelancer last answered for this cached user."""
    return entry[1]


def record_of(entry: CachedUser) -> UserRecord:
    """The record behind a cache entry."""
    return UserRecord._make(entry[2])


class LRU(Generic[V]):
    """A dict that forgets its least recently used key past `maxsize` entries."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.data: OrderedDict[int, V] = OrderedDict()

    def get(self, key: int) -> V | None:
        """The value, marked as just used; None when absent."""
        value = self.data.get(key)
        if value is not None:
            self.data.move_to_end(key)
        return value

    def put(self, key: int, value: V) -> None:
        """Insert or replace, evicting the oldest entry when full."""
        self.data[key] = value
        self.data.move_to_end(key)
        if len(self.data) > self.maxsize:
            self.data.popitem(last=False)

    def pop(self, key: int) -> V | None:
        """Remove and return, or None."""
        return self.data.pop(key, None)

    def items(self) -> list[tuple[int, V]]:
        """A snapshot of the entries, oldest first."""
        return list(self.data.items())

    def __len__(self) -> int:
        return len(self.data)

    def __contains__(self, key: object) -> bool:
        return key in self.data


class ExpiringMap(Generic[V]):
    """Ids remembered with a value until a deadline; bounded, oldest insert evicted first."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.data: OrderedDict[int, tuple[float, V]] = OrderedDict()

    def get(self, key: int, now: float) -> V | None:
        """The value while unexpired, else None (and the entry is dropped)."""
        item = self.data.get(key)
        if item is None:
            return None
        if item[0] <= now:
            del self.data[key]
            return None
        return item[1]

    def put(self, key: int, value: V, expires_at: float) -> None:
        """Remember `key` until `expires_at`."""
        self.data.pop(key, None)
        self.data[key] = (expires_at, value)
        if len(self.data) > self.maxsize:
            self.data.popitem(last=False)

    def pop(self, key: int) -> bool:
        """Forget `key`; True when it was there."""
        return self.data.pop(key, None) is not None
