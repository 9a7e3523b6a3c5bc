"""Bounded in-memory maps: the LRU of users in front of the store, and expiring id sets."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Generic, TypeVar

import orjson

from app.domain import UserRecord

V = TypeVar("V")


CachedUser = tuple[tuple[Any, ...], bytes]
"""A user held in memory: the record's fields, and its JSON object rendered once (without
the closing brace, so each response appends its own `source` and `stale`).

Exact tuples of strings, numbers and bytes on purpose: Python's cyclic GC untracks them,
so 100 000 cached users add nothing to the full collections that otherwise stall every
request (p99 120 ms -> 10 ms in `make bench`). A dataclass, a NamedTuple or a dict inside
would keep each entry tracked.
"""

FETCHED_AT = UserRecord._fields.index("fetched_at")


def cache_entry(record: UserRecord) -> CachedUser:
    """The in-memory form of a record."""
    return (tuple(record), orjson.dumps(record.public())[:-1])


def fetched_at(entry: CachedUser) -> float:
    """When Freelancer last answered for this cached user."""
    value: float = entry[0][FETCHED_AT]
    return value


def record_of(entry: CachedUser) -> UserRecord:
    """The record behind a cache entry."""
    return UserRecord._make(entry[0])


class LRU(Generic[V]):
    """A dict that forgets its least recently used key past `maxsize` entries."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[int, V] = OrderedDict()

    def get(self, key: int) -> V | None:
        """The value, marked as just used; None when absent."""
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: int, value: V) -> None:
        """Insert or replace, evicting the oldest entry when full."""
        self._data[key] = value
        self._data.move_to_end(key)
        if len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def pop(self, key: int) -> V | None:
        """Remove and return, or None."""
        return self._data.pop(key, None)

    def items(self) -> list[tuple[int, V]]:
        """A snapshot of the entries, oldest first."""
        return list(self._data.items())

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data


class ExpiringMap(Generic[V]):
    """Ids remembered with a value until a deadline; bounded, oldest insert evicted first."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[int, tuple[float, V]] = OrderedDict()

    def get(self, key: int, now: float) -> V | None:
        """The value while unexpired, else None (and the entry is dropped)."""
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] <= now:
            del self._data[key]
            return None
        return item[1]

    def put(self, key: int, value: V, expires_at: float) -> None:
        """Remember `key` until `expires_at`."""
        self._data.pop(key, None)
        self._data[key] = (expires_at, value)
        if len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def pop(self, key: int) -> bool:
        """Forget `key`; True when it was there."""
        return self._data.pop(key, None) is not None
