"""What memory holds for a cached user, what it costs, and how the LRU forgets: no I/O."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.config import Settings
from app.domain import UserRecord
from app.gateway.cache import LRU, cache_entry, from_store, record_of, user_id_of
from app.gateway.memory import Answers, Memory
from app.gateway.results import LookupResult, render
from app.gateway.stats import GatewayStats

NOW = 1_800_000_000.0


def user(user_id: int, *, fetched_at: float = NOW, **fields: object) -> UserRecord:
    values: dict[str, object] = {
        "username": f"amberfalcon{user_id}",
        "display_name": f"Amber Falcon {user_id}",
        "country": "Australia",
        "city": "Sydney",
        "role": "freelancer",
        "registration_date": 1_400_000_000.0 + user_id,
        "avatar_url": f"https://cdn.example.test/avatars/{user_id}.jpg",
        "created_at": fetched_at - 86_000.75,
        "fetched_at": fetched_at,
    }
    values.update(fields)
    return UserRecord(user_id, **values)  # type: ignore[arg-type]


def memory(tmp_path: Path, **overrides: object) -> Memory:
    return Memory(Settings(_env_file=None, sqlite_path=tmp_path / "u.db", **overrides))  # type: ignore[arg-type]


def test_an_entry_is_the_json_and_fetched_at_and_gives_the_record_back() -> None:
    record = user(12345, fetched_at=NOW + 0.625, display_name='Zoë "Z" ☃', city=None)
    entry = cache_entry(record)
    assert entry == (record.rendered()[:-1], NOW + 0.625)
    assert type(entry) is tuple and all(type(part) in (bytes, float) for part in entry)
    assert from_store((record.rendered(), record.fetched_at)) == entry
    assert user_id_of(entry) == 12345
    # The record read back shows what clients saw: times to the second, fetched_at exact.
    back = record_of(entry)
    assert back == record._replace(created_at=NOW - 86_001, registration_date=1_400_012_345.0)
    assert back.rendered() == record.rendered()


def test_a_cached_user_costs_its_json_and_little_more() -> None:
    """Memory per cached user: its JSON, the entry and the map's slot; not a record."""
    records = [user(i) for i in range(10_000, 12_000)]
    json_bytes = sum(len(r.rendered()) for r in records)
    lru: LRU[tuple[bytes, float]] = LRU(100_000)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for record in records:
        lru.put(record.user_id, cache_entry(record))
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    overhead = (held - json_bytes) / len(records)
    # bytes header 33, tuple 56, float 24, dict slot about 52: 165 B; the earlier tuple of
    # every field added about 600 B more.
    assert overhead < 200, f"{overhead:.0f} B per user beyond its JSON"


def test_the_lru_holds_at_most_maxsize_and_forgets_the_unused_first() -> None:
    lru: LRU[str] = LRU(4)
    for key in (1, 2, 3, 4):
        lru.put(key, f"v{key}")
    lru.put(5, "v5")  # full: the first in goes
    assert 1 not in lru and len(lru) == 4
    assert lru.get(2) == "v2"  # used since: kept
    lru.put(6, "v6")
    lru.put(7, "v7")
    assert [k for k in (2, 3, 4, 5, 6, 7) if k in lru] == [2, 5, 6, 7]
    lru.put(5, "v5 again")  # a replacement takes no room
    assert len(lru) == 4 and lru.get(5) == "v5 again"
    assert lru.pop(6) == "v6" and lru.pop(6) is None and len(lru) == 3


def test_a_peek_answers_without_marking_the_user_used() -> None:
    """Refresh-ahead looks at its popular users' copies: a look is not a read, so it must
    not keep a user in memory that clients no longer ask for."""
    lru: LRU[str] = LRU(2)
    lru.put(1, "v1")
    lru.put(2, "v2")
    lru.put(3, "v3")  # full: 1 goes, 2 is now the oldest
    assert lru.peek(2) == "v2" and lru.peek(3) == "v3" and lru.peek(1) is None
    lru.put(4, "v4")
    assert 2 not in lru and lru.peek(4) == "v4"


@given(
    st.lists(st.tuples(st.sampled_from(["put", "get", "pop"]), st.integers(0, 12)), max_size=300)
)
def test_the_lru_never_grows_past_maxsize_nor_answers_a_wrong_value(
    operations: list[tuple[str, int]],
) -> None:
    lru: LRU[tuple[int, int]] = LRU(5)
    last: dict[int, tuple[int, int]] = {}
    for step, (operation, key) in enumerate(operations):
        if operation == "put":
            last[key] = (key, step)
            lru.put(key, last[key])
            assert lru.get(key) == last[key], "a key just put is held"
        elif operation == "get":
            value = lru.get(key)
            assert value is None or value == last.get(key)
        else:
            lru.pop(key)
            last.pop(key, None)
            assert key not in lru
        assert len(lru) <= 5
        assert len(lru.items()) == len(lru)


def test_store_hits_are_held_unless_memory_has_a_newer_copy(tmp_path: Path) -> None:
    held = memory(tmp_path, cache_ttl_s=1000)
    newer, older = user(1, fetched_at=NOW), user(1, fetched_at=NOW - 10, username="older")
    held.learn(1, cache_entry(newer), NOW)
    answers: Answers = {}
    two = user(2, fetched_at=NOW - 5)
    stored = {1: (older.rendered(), older.fetched_at), 2: (two.rendered(), two.fetched_at)}
    pending, stale = held.answer([1, 2, 3], NOW, answers, {}, stored)
    assert (pending, stale) == ([3], [])
    assert answers[1] == ("cache", cache_entry(newer)), "a fetch that landed meanwhile wins"
    assert answers[2] == ("cache", cache_entry(two))
    answered = held.fresh([1, 2], NOW)
    assert answered is not None, "now held"
    assert (list(answered[0]), answered[1]) == ([cache_entry(newer), answers[2][1]], [])


def test_a_batch_of_fresh_hits_renders_as_one_join_the_same_bytes(tmp_path: Path) -> None:
    """The hot path's join and the per-user path give one body, as orjson would write it."""
    users = [user(i) for i in (3, 1, 2)]
    entries = [cache_entry(u) for u in users]
    joined = LookupResult(entries).to_json()
    answers: Answers = {u.user_id: ("cache", e) for u, e in zip(users, entries, strict=True)}
    stats = GatewayStats()
    rendered = render([3, 1, 2], answers, stats)
    assert rendered.sources is None and stats.cache_hits == 3
    assert rendered.to_json() == joined
    expected = {
        "users": [{**u.public(), "source": "cache", "stale": False} for u in users],
        "total_count": 3,
        "not_found": [],
        "unavailable": [],
        "errors": {},
    }
    assert joined == orjson.dumps(expected)
    answers[1] = ("stale", entries[1])
    mixed = render([3, 1, 2], answers, GatewayStats())
    expected["users"][1].update(source="stale", stale=True)  # type: ignore[index]
    assert mixed.to_json() == orjson.dumps(expected)
    assert mixed.user_json(1) == orjson.dumps(expected["users"][1])  # type: ignore[index]
    assert LookupResult([]).to_json() == orjson.dumps({**expected, "users": [], "total_count": 0})


def test_a_full_memory_admits_a_store_hit_only_if_asked_more_than_its_victim(
    tmp_path: Path,
) -> None:
    from app.gateway.popularity import Popularity

    mem = memory(tmp_path, memory_cache_size=1000)
    stored = {i: (user(i).rendered(), NOW) for i in range(1, 1003)}
    mem.answer(range(1, 1001), NOW, {}, {}, stored)  # room: every store hit is held
    assert len(mem) == 1000
    counts = Popularity(min_hits=3, max_ids=10_000, decay_s=3600.0, now=NOW)
    counts.counts.update({i: 5 for i in range(1, 1001)} | {1002: 9})
    mem.popularity = counts
    answers: Answers = {}
    pending, _ = mem.answer([1001, 1002], NOW, answers, {}, stored)
    assert not pending and answers[1001][1] == from_store(stored[1001])  # answered anyway
    assert 1001 not in mem.users  # asked less than the user it would evict: not held
    assert 1002 in mem.users and len(mem) == 1000  # asked more: held, one user evicted
    mem.popularity = None  # no counts: held as before
    mem.answer([1001], NOW, {}, {}, stored)
    assert 1001 in mem.users and len(mem) == 1000


def test_the_lru_names_the_victim_its_next_put_evicts() -> None:
    lru: LRU[int] = LRU(3)
    for key in (1, 2, 3):
        lru.put(key, key)
    for key in (4, 5, 6, 7):
        victim = lru.victim()
        assert victim is not None and victim in lru
        lru.put(key, key)
        assert victim not in lru and len(lru) == 3


@given(
    held=st.dictionaries(
        st.integers(1, 12),
        st.tuples(
            st.booleans(),
            # Fresh past 0, stale at 0 and before: the edge, fractions of a second either side.
            st.sampled_from([-30.0, -0.75, -0.001, 0.0, 0.001, 0.75]) | st.floats(-50, 50),
        ),
        max_size=12,
    ),
    missing=st.sets(st.integers(1, 12), max_size=4),
    data=st.data(),
    flips=st.integers(0, 3),
)
def test_fresh_answers_a_batch_only_when_every_id_is_held_fresh_or_known_missing(
    tmp_path_factory: pytest.TempPathFactory,
    held: dict[int, tuple[bool, float]],
    missing: set[int],
    data: st.DataObject,
    flips: int,
) -> None:
    """`fresh`'s two ways (every id in the recent generation, read in C; or the loop,
    which also finds older entries and known-missing ids) against a model: the batch is
    answered, users in request order, exactly when each id is held fresh or known not to
    exist."""
    # Mostly ids held in the recent generation (the C way), sometimes any.
    recent = sorted(uid for uid, (in_recent, _) in held.items() if in_recent)
    from_recent: bool = bool(recent) and data.draw(st.booleans())
    ids: st.SearchStrategy[int] = st.sampled_from(recent) if from_recent else st.integers(1, 12)
    asked = data.draw(st.lists(ids, min_size=1, max_size=8, unique=True))
    ttl = 100.0
    mem = memory(tmp_path_factory.mktemp("m"), cache_ttl_s=ttl)
    for uid, (in_recent, age) in held.items():
        target = mem.users.recent if in_recent else mem.users.older
        target[uid] = cache_entry(user(uid, fetched_at=NOW - ttl + age))
    for uid in missing - held.keys():
        mem.not_found.put(uid, True, NOW + 10)
    for _ in range(flips):  # an older entry read once moves to the recent generation
        mem.users.get(next(iter(mem.users.older), 0))
    fresh = {uid: NOW - ttl + age > NOW - ttl for uid, (_, age) in held.items()}
    answerable = all(fresh.get(uid, uid in missing) for uid in asked)
    answered = mem.fresh(asked, NOW)
    if not answerable:
        assert answered is None
        return
    assert answered is not None
    users, not_found = answered
    assert [user_id_of(entry) for entry in users] == [uid for uid in asked if uid in held]
    assert not_found == [uid for uid in asked if uid not in held]
