"""Red team of the hot path (`Memory.fresh` in C) and the store path's admission (the
victim's count looked up once a lookup): each against the slow way it replaced, on copies
of one memory, over sequences of lookups that share it."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, note, settings
from hypothesis import strategies as st

from app.config import Settings
from app.domain import StoredUser, UserRecord
from app.gateway.cache import LRU, CachedUser, cache_entry, from_store, record_of
from app.gateway.memory import Answers, Memory
from app.gateway.popularity import Popularity
from app.gateway.results import NOT_FOUND, LookupResult, render
from app.gateway.stats import GatewayStats

NOW = 1_800_000_000.0
TTL = 100.0
GRACE = 50.0
"""STALE_IF_ERROR_S: a copy older than TTL but within this is served stale."""
IDS = st.integers(1, 10)
# Ages around both edges (fresh / stale / too stale), fractions of a second either side,
# and anything in between.
AGES = st.sampled_from(
    [0.0, 10.0, TTL - 0.001, TTL, TTL + 0.001, TTL + 0.5, TTL + GRACE, TTL + GRACE + 0.001]
) | st.floats(0, 2 * (TTL + GRACE), allow_nan=False)


@cache
def entry_of(user_id: int, fetched_at: float) -> CachedUser:
    return cache_entry(
        UserRecord(
            user_id,
            username=f"amberfalcon{user_id}",
            display_name=f"Amber Falcon {user_id}",
            country="Australia",
            city="Sydney",
            role="freelancer",
            registration_date=1_400_000_000.0 + user_id,
            avatar_url=f"https://cdn.example.test/avatars/{user_id}.jpg",
            created_at=fetched_at - 86_000.75,
            fetched_at=fetched_at,
        )
    )


def stored_of(user_id: int, fetched_at: float) -> StoredUser:
    """The store's form of a user: its whole JSON and when it was fetched."""
    entry = entry_of(user_id, fetched_at)
    return (entry[0] + b"}", fetched_at)


# --- the reference: the code before 3a22af7 and 2324188, the victim looked up every id --


def reference_fresh(
    mem: Memory, user_ids: Sequence[int], now: float
) -> tuple[list[CachedUser], list[int]] | None:
    users, fresh_after = mem.users, now - mem.ttl_s
    entries: list[CachedUser] = []
    missing: list[int] = []
    for uid in user_ids:
        entry = users.get(uid)
        if entry is None:
            if mem.not_found.get(uid, now) is None:
                return None
            missing.append(uid)
            continue
        if not entry[1] > fresh_after:
            return None
        entries.append(entry)
    return entries, missing


def reference_admits(mem: Memory, user_id: int) -> bool:
    users = mem.users
    if mem.popularity is None or len(users) < users.maxsize:
        return True
    counts = mem.popularity.counts
    victim = users.victim()
    return counts.get(user_id, 0) > (0 if victim is None else counts.get(victim, 0))


def reference_answer(
    mem: Memory,
    user_ids: Iterable[int],
    now: float,
    answers: Answers,
    previous: dict[int, UserRecord],
    stored: Mapping[int, StoredUser] | None,
) -> tuple[list[int], list[UserRecord]]:
    fresh_after = now - mem.ttl_s
    servable_after = fresh_after - mem.stale_if_error_s
    users = mem.users
    pending: list[int] = []
    stale: list[UserRecord] = []
    for uid in user_ids:
        entry = users.get(uid)
        found = stored.get(uid) if stored else None
        if (
            found is not None
            and (entry is None or entry[1] < found[1])
            and not mem.evicted_after(uid, found[1])
        ):
            held = entry is not None
            entry = from_store(found)
            if held or reference_admits(mem, uid):
                users.put(uid, entry)
        if entry is not None:
            if entry[1] > fresh_after:
                answers[uid] = ("cache", entry)
                continue
            if entry[1] > servable_after:
                answers[uid] = ("stale", entry)
                stale.append(record_of(entry))
                continue
            previous[uid] = record_of(entry)
        if mem.not_found.get(uid, now) is not None:
            answers[uid] = ("cache", NOT_FOUND)
            continue
        pending.append(uid)
    return pending, stale


# --- building memories ---------------------------------------------------------------


def new_memory(tmp_path: Path, maxsize: int) -> Memory:
    mem = Memory(
        Settings(
            _env_file=None,
            sqlite_path=tmp_path / "u.db",
            cache_ttl_s=TTL,
            stale_if_error_s=GRACE,
        )
    )
    mem.users = LRU(maxsize)  # MEMORY_CACHE_SIZE is at least 1000; the rules are size-free
    return mem


def state(mem: Memory) -> Any:
    """Everything a later lookup's answer depends on, in order: both generations, the
    order the next puts evict in, the negative caches."""
    users = mem.users
    evicting = [key for key in users._order if key in users.older]
    return (
        list(users.recent.items()),
        list(users.older.items()),
        evicting,
        users.victim(),
        list(mem.not_found.data.items()),
        list(mem.evicted.data.items()),
    )


def shown(mem: Memory) -> str:
    """A memory in short: ids with their ages, the eviction order, negative caches, counts."""
    users = mem.users
    ages = {uid: NOW - entry[1] for uid, entry in users.recent.items()}
    older = {uid: NOW - entry[1] for uid, entry in users.older.items()}
    counts = None if mem.popularity is None else dict(mem.popularity.counts)
    return (
        f"size={users.maxsize} recent={ages} older={older} order={list(users._order)} "
        f"not_found={dict(mem.not_found.data)} evicted={dict(mem.evicted.data)} counts={counts}"
    )


@st.composite
def memories(draw: st.DrawFn, tmp_path: Path) -> Memory:
    """A memory of 2-5 users built by real puts and reads (so with both generations and
    flips), some ids known not to exist, some evicted lately, and counts with many ties."""
    mem = new_memory(tmp_path, draw(st.integers(2, 5)))
    for _ in range(draw(st.integers(0, 14))):
        uid = draw(IDS)
        if draw(st.integers(0, 3)):
            mem.users.put(uid, entry_of(uid, NOW - draw(AGES)))
        else:
            mem.users.get(uid)
    for uid in draw(st.sets(IDS, max_size=3)):
        mem.not_found.put(uid, True, NOW + draw(st.sampled_from([-1.0, 0.0, 0.001, 5.0])))
    for uid in draw(st.sets(IDS, max_size=2)):
        mem.evicted.put(uid, NOW - draw(AGES), NOW + 300)
    if draw(st.integers(0, 4)):
        popularity = Popularity(min_hits=3, max_ids=100, decay_s=3600.0, now=NOW)
        popularity.counts = Counter(draw(st.dictionaries(IDS, st.integers(0, 3))))
        mem.popularity = popularity
    return mem


Lookup = tuple[str, list[int], float, dict[int, float]]

lookups = st.lists(
    st.tuples(
        st.sampled_from(["fresh", "answer"]),
        st.lists(IDS, min_size=1, max_size=8),
        st.sampled_from([0.0, 0.001, 0.5, TTL - 0.001, TTL]) | st.floats(0, 20),
        st.dictionaries(IDS, AGES, max_size=8),
    ),
    min_size=1,
    max_size=5,
)


def replay(tmp_path: Path, mem: Memory, steps: list[Lookup]) -> None:
    """Run `steps` on a memory and on its copy, the new way and the reference way: the
    same answers (to the byte), the same memory after each, never over its size."""
    model = copy.deepcopy(mem)
    note(f"memory: {shown(mem)}")
    note(f"steps: {steps}")
    now = NOW
    for kind, asked, advance, ages in steps:
        now += advance
        if kind == "fresh":
            ids = list(dict.fromkeys(asked))  # a lookup's ids are distinct
            got, want = mem.fresh(ids, now), reference_fresh(model, ids, now)
            assert (got is None) == (want is None), (ids, got, want)
            if got is not None and want is not None:
                assert (list(got[0]), got[1]) == want
                body = LookupResult(got[0], not_found=got[1]).to_json()
                assert body == LookupResult(want[0], not_found=want[1]).to_json()
                # What a client sees: only copies fresh at `now`, "cache", in request order.
                users = orjson.loads(body)["users"]
                assert [u["user_id"] for u in users] == [i for i in ids if i not in got[1]]
                assert all(entry[1] > now - TTL for entry in got[0])
        else:
            stored = {uid: stored_of(uid, now - age) for uid, age in ages.items()}
            answers: Answers = {}
            previous: dict[int, UserRecord] = {}
            ref_answers: Answers = {}
            ref_previous: dict[int, UserRecord] = {}
            got_answer = mem.answer(asked, now, answers, previous, stored or None)
            want_answer = reference_answer(
                model, asked, now, ref_answers, ref_previous, stored or None
            )
            assert got_answer == want_answer
            assert answers == ref_answers and previous == ref_previous
            answered = [uid for uid in dict.fromkeys(asked) if uid in answers]
            stats, ref_stats = GatewayStats(), GatewayStats()
            body = render(answered, answers, stats).to_json()
            assert body == render(answered, ref_answers, ref_stats).to_json()
            assert stats == ref_stats
        assert state(mem) == state(model), (kind, asked)
        assert len(mem.users) <= mem.users.maxsize


@settings(max_examples=600, deadline=None)
@given(data=st.data(), steps=lookups)
def test_lookups_sharing_a_memory_answer_and_keep_what_the_slow_way_does(
    tmp_path_factory: Any, data: st.DataObject, steps: list[Lookup]
) -> None:
    """Mixed fresh/stale/too-stale/missing/not-found/older-generation ids, store hits
    admitted or not, in sequences of lookups on one memory: answers and memory after each
    lookup as the per-id loop and the victim looked up for every id would leave them."""
    tmp_path = tmp_path_factory.mktemp("m")
    replay(tmp_path, data.draw(memories(tmp_path)), steps)


def test_a_user_asked_after_a_flip_in_the_same_lookup_is_marked_used(tmp_path: Path) -> None:
    """A store hit's put may flip the generations (`recent` becomes `older`): a user the
    same lookup then finds held is used, so it moves to `recent` and the next put evicts
    a user not asked for, not it. With the generations read once before the loop, the
    lookup went on reading the old `recent` (now `older`) and left user 2 first in line:
    the store hit after it evicted the user just answered."""
    mem = new_memory(tmp_path, 3)
    for uid in (1, 2, 3):
        mem.users.put(uid, entry_of(uid, NOW))
    stored = {uid: stored_of(uid, NOW) for uid in (4, 5)}
    answers: Answers = {}
    assert mem.answer([4, 2, 5], NOW, answers, {}, stored) == ([], [])
    assert [answers[uid][0] for uid in (4, 2, 5)] == ["cache"] * 3
    assert 2 in mem.users and 3 not in mem.users, "the user asked for stays; 3 goes"
    assert list(mem.users.recent) == [4, 2, 5] and len(mem.users) == 3
