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
from app.http.schemas.users import parse_user_ids
from tests.support.apps import StartApp
from tests.support.clock import FakeClock
from tests.support.freelancer import FakeFreelancer

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


ADVANCES = st.sampled_from([0.0, 0.001, 0.5, TTL - 0.001, TTL]) | st.floats(0, 20)


def asked_ids(data: st.DataObject, mem: Memory, *, kind: str) -> list[int]:
    """A lookup's ids: often only ids held in the recent generation (the hot path's C
    way), or mostly ids held anywhere, else any; fresh's distinct, answer's maybe not."""
    recent, held = sorted(mem.users.recent), sorted([*mem.users.recent, *mem.users.older])
    choice = data.draw(st.integers(0, 2))
    pool = IDS
    if choice == 0 and recent:
        pool = st.sampled_from(recent)
    elif choice == 1 and held:
        pool = st.sampled_from(held) | IDS
    return data.draw(st.lists(pool, min_size=1, max_size=8, unique=kind == "fresh"))


def replay(data: st.DataObject, mem: Memory, steps: int) -> None:
    """Run `steps` lookups on a memory and on its copy, the new way and the reference
    way: the same answers (to the byte), the same memory after each, never over its size."""
    model = copy.deepcopy(mem)
    note(f"memory: {shown(mem)}")
    now = NOW
    for _ in range(steps):
        kind = data.draw(st.sampled_from(["fresh", "answer"]))
        asked = asked_ids(data, mem, kind=kind)
        now += data.draw(ADVANCES)
        if kind == "fresh":
            got, want = mem.fresh(asked, now), reference_fresh(model, asked, now)
            assert (got is None) == (want is None), (asked, got, want)
            if got is not None and want is not None:
                assert (list(got[0]), got[1]) == want
                body = LookupResult(got[0], not_found=got[1]).to_json()
                assert body == LookupResult(want[0], not_found=want[1]).to_json()
                # What a client sees: only copies fresh at `now`, "cache", in request order.
                users = orjson.loads(body)["users"]
                assert [u["user_id"] for u in users] == [i for i in asked if i not in got[1]]
                assert all(entry[1] > now - TTL for entry in got[0])
        else:
            ages = data.draw(st.dictionaries(IDS, AGES, max_size=8))
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
@given(data=st.data(), steps=st.integers(1, 5))
def test_lookups_sharing_a_memory_answer_and_keep_what_the_slow_way_does(
    tmp_path_factory: Any, data: st.DataObject, steps: int
) -> None:
    """Mixed fresh/stale/too-stale/missing/not-found/older-generation ids, store hits
    admitted or not, in sequences of lookups on one memory: answers and memory after each
    lookup as the per-id loop and the victim looked up for every id would leave them."""
    tmp_path = tmp_path_factory.mktemp("m")
    replay(data, data.draw(memories(tmp_path)), steps)


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


@settings(max_examples=400, deadline=None)
@given(
    size=st.integers(2, 5),
    extra=st.integers(0, 3),
    reads=st.lists(st.integers(1, 9), max_size=4),
    counts=st.dictionaries(st.integers(1, 12), st.integers(0, 3)),
    asked=st.lists(st.integers(1, 12), min_size=2, max_size=10, unique=True),
    newer=st.sets(st.integers(1, 12)),
)
def test_a_full_memory_admits_each_store_hit_against_the_victim_of_its_own_put(
    tmp_path_factory: Any,
    size: int,
    extra: int,
    reads: list[int],
    counts: dict[int, int],
    asked: list[int],
    newer: set[int],
) -> None:
    """One lookup of many store hits into a full memory, held users of both generations
    between them (each read moves one to `recent`, maybe the victim): a hit is held iff
    asked more than the user that put evicts, as looking the victim up for every id
    decides, and memory keeps its size. Counts tie often (0-3) so `>` and `>=` differ."""
    mem = new_memory(tmp_path_factory.mktemp("m"), size)
    for uid in range(1, size + extra + 1):  # past the size: a flip, an older generation
        mem.users.put(uid, entry_of(uid, NOW - 10))
    for uid in reads:
        mem.users.get(uid)
    popularity = Popularity(min_hits=3, max_ids=100, decay_s=3600.0, now=NOW)
    popularity.counts = Counter(counts)
    mem.popularity = popularity
    # Every id is in the store (so each is answered, even one evicted by the lookup
    # itself), some with a copy newer than memory's.
    stored = {uid: stored_of(uid, NOW - (5 if uid in newer else 10)) for uid in asked}
    model = copy.deepcopy(mem)
    note(f"memory: {shown(mem)}")
    answers: Answers = {}
    ref_answers: Answers = {}
    got = mem.answer(asked, NOW, answers, {}, stored)
    assert got == reference_answer(model, asked, NOW, ref_answers, {}, stored) == ([], [])
    assert answers == ref_answers
    assert state(mem) == state(model)
    assert len(mem.users) == size


@settings(max_examples=300, deadline=None)
@given(
    now=st.sampled_from([NOW, NOW + 0.001, NOW + 0.25, NOW + 0.1]) | st.floats(NOW, NOW + 60),
    deltas=st.dictionaries(
        st.integers(1, 8), st.sampled_from([-0.5, -0.001, 0.0, 0.001, 0.5]), min_size=1
    ),
    data=st.data(),
)
def test_a_copy_fetched_exactly_ttl_ago_is_not_fresh_in_either_way(
    tmp_path_factory: Any, now: float, deltas: dict[int, float], data: st.DataObject
) -> None:
    """Every asked user held in the recent generation (the C way for two or more, the
    loop for one), each fetched a fraction of a second either side of `now - TTL`, or
    exactly then: the batch is answered "cache" only if every copy is strictly younger."""
    mem = new_memory(tmp_path_factory.mktemp("m"), 10)
    for uid, delta in deltas.items():
        mem.users.put(uid, entry_of(uid, now - TTL + delta))
    asked = data.draw(st.lists(st.sampled_from(sorted(deltas)), min_size=1, unique=True))
    model = copy.deepcopy(mem)
    got = mem.fresh(asked, now)
    want = reference_fresh(model, asked, now)
    if all(deltas[uid] > 0 for uid in asked):
        assert got is not None and want is not None
        assert list(got[0]) == want[0] and got[1] == want[1] == []
    else:
        assert got is None and want is None, "a copy TTL old or older is not fresh"


@given(
    ids=st.lists(st.integers(1, 5_000_000_000), min_size=1, max_size=50),
    repeat=st.integers(0, 3),
)
def test_parsed_ids_are_the_request_s_in_order_duplicates_folded(
    ids: list[int], repeat: int
) -> None:
    """`parse_user_ids` returns the list it parsed when it has no duplicates: the same
    ids, in order, as the copy it made before."""
    sent = ids + ids[:repeat]
    body = orjson.dumps({"user_ids": sent})
    assert parse_user_ids(body, max_ids=100) == list(dict.fromkeys(sent))


async def test_a_request_s_ids_answer_in_its_order_and_stay_as_sent(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """POST /api/users through the app's fast path: ids with duplicates answer the bytes
    the same ids without them do, users in request order; the parsed list the gateway keeps
    (PendingLookup, the refresh-ahead sample: not a copy any more) is the request's
    distinct ids, unchanged after every answer."""
    running = await start_app(clock=FakeClock(), cache_ttl_s=TTL)
    popularity = running.gateway.refresh_ahead.popularity
    sampled: list[list[int]] = []
    saw = popularity.saw

    def keep(user_ids: list[int]) -> None:
        sampled.append(user_ids)  # the object itself: a later change shows
        saw(user_ids)

    popularity.saw = keep  # type: ignore[method-assign,assignment]
    await running.lookup(5, 3, 8)
    assert await running.gateway.wait_idle(5)
    with_duplicates = await running.client.post("/api/users", json={"user_ids": [3, 9, 3, 5, 9]})
    assert await running.gateway.wait_idle(5)
    distinct = await running.client.post("/api/users", json={"user_ids": [3, 9, 5]})
    again = await running.client.post("/api/users", json={"user_ids": [3, 9, 3, 5, 9]})
    assert [u["user_id"] for u in with_duplicates.json()["users"]] == [3, 9, 5]
    assert with_duplicates.json()["total_count"] == 3
    assert again.content == distinct.content, "all fresh from memory now: the same bytes"
    assert b'"source":"cache","stale":false' in distinct.content
    assert sampled[1:] == [[3, 9, 5]] * 3, "the kept id lists are the request's, unchanged"
    assert freelancer.lookups.keys() == {3, 5, 8, 9}
