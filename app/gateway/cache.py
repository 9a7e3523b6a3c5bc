"""Bounded in-memory maps: the LRU of users in front of the store, and expiring id sets."""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Generic, TypeVar

import orjson

from app.domain import StoredUser, UserRecord

V = TypeVar("V")


CachedUser = tuple[bytes, float]
"""A user held in memory: its JSON object (`UserRecord.rendered()`, as the store keeps it)
without the closing brace, and when it was fetched. Nothing else: a hit needs no more, and
the tuple of every field held beside them cost about 600 B more a user. Where code needs
the record, `record_of` reads it back from the JSON.

The brace is left off so that a batch of fresh hits is one `join` with `CACHE_JOIN`, the
commonest answer's `"source":"cache","stale":false}` and a comma, between the users (and
`CACHE_TAIL` after the last); other sources append their own tail. `fetched_at` sits in
the entry itself: a fresh hit reads nothing else but its JSON (each object touched is a
likely cache miss when 100 000 users are held).

Exact tuples of bytes and a float on purpose: Python's cyclic GC untracks them, so
100 000 cached users add nothing to the full collections that otherwise stall every
request (p99 120 ms -> 10 ms in `make bench`). A dataclass, a NamedTuple or a dict inside
would keep each entry tracked.
"""

CACHE_TAIL = b',"source":"cache","stale":false}'
CACHE_JOIN = CACHE_TAIL + b","
_ID_AT = len(b'{"user_id":')


def cache_entry(record: UserRecord) -> CachedUser:
    """The in-memory form of a record."""
    return (record.rendered()[:-1], record.fetched_at)


def from_store(stored: StoredUser) -> CachedUser:
    """The in-memory form of a user as the store answers it (its JSON, already rendered)."""
    return (stored[0][:-1], stored[1])


def fetched_at(entry: CachedUser) -> float:
    """When Freelancer last answered for this cached user."""
    return entry[1]


def record_of(entry: CachedUser) -> UserRecord:
    """The record behind a cache entry, read back from its JSON (times to the second but
    `fetched_at`: all a refresh or a job needs, and what clients saw)."""
    return UserRecord.from_public(orjson.loads(entry[0] + b"}"), fetched_at=entry[1])


def user_id_of(entry: CachedUser) -> int:
    """The id of a cached user: the JSON's first field."""
    json = entry[0]
    return int(json[_ID_AT : json.index(b",", _ID_AT)])


class LRU(Generic[V]):
    """A map of at most `maxsize` entries that forgets the least recently used first,
    in two generations (an approximation in the way CLOCK approximates LRU).

    `recent` holds what was used (read or written) since the last flip, `older` the rest.
    A read in `recent` is one dict lookup and moves nothing; a read in `older` moves the
    entry to `recent`. Room is made by dropping from `older` in the order its entries
    came into the previous generation; once `older` is empty, `recent` becomes `older`
    (the flip). So an entry unused since the last flip goes before any used since.

    Two plain dicts rather than an OrderedDict: an OrderedDict keeps a linked node and a
    node index per entry (about 105 B against a dict's 52, measured with 100 000), and
    its `move_to_end` on every hit was the hot path's only write.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.recent: dict[int, V] = {}
        self.older: dict[int, V] = {}
        self._order: deque[int] = deque()
        """`older`'s keys as they came into it (some since gone): the order of eviction."""

    def get(self, key: int) -> V | None:
        """The value, marked as just used; None when absent."""
        value = self.recent.get(key)
        if value is None:
            value = self.older.pop(key, None)
            if value is not None:
                self.recent[key] = value
        return value

    def peek(self, key: int) -> V | None:
        """The value, not marked as used (a look that is not a read); None when absent."""
        value = self.recent.get(key)
        return value if value is not None else self.older.get(key)

    def put(self, key: int, value: V) -> None:
        """Insert or replace (marked as just used), evicting when full."""
        recent, older = self.recent, self.older
        new = key not in recent and older.pop(key, None) is None
        if new and len(recent) + len(older) >= self.maxsize:
            self._evict()
        self.recent[key] = value

    def _evict(self) -> None:
        if not self.older:
            self.older, self.recent = self.recent, {}
            self._order = deque(self.older)
        older, order = self.older, self._order
        while order:
            if older.pop(order.popleft(), None) is not None:
                return

    def victim(self) -> int | None:
        """The key the next `put` of a new key into a full map would evict (None: empty)."""
        older, order = self.older, self._order
        while order and order[0] not in older:
            order.popleft()  # gone since it came into `older`: `_evict` would skip it too
        if order:
            return order[0]
        return next(iter(self.recent), None)  # the flip makes `recent`'s first the next

    def pop(self, key: int) -> V | None:
        """Remove and return, or None."""
        value = self.recent.pop(key, None)
        return self.older.pop(key, None) if value is None else value

    def items(self) -> list[tuple[int, V]]:
        """A snapshot of the entries, the older generation first."""
        return [*self.older.items(), *self.recent.items()]

    def __len__(self) -> int:
        return len(self.recent) + len(self.older)

    def __contains__(self, key: object) -> bool:
        return key in self.recent or key in self.older


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
