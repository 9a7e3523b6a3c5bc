"""Every store operation, against every store."""

from __future__ import annotations

import time

import pytest

from app.domain import UserRecord
from app.store import UserStore

NOW = float(int(time.time()))


def user(user_id: int, *, fetched_at: float = NOW, **fields: object) -> UserRecord:
    values: dict[str, object] = {
        "username": f"user{user_id}",
        "display_name": f"User {user_id}",
        "country": "Kenya",
        "city": "Nairobi",
        "role": "freelancer",
        "registration_date": 1_400_000_000.0,
        "avatar_url": f"https://cdn.test/{user_id}.jpg",
        "created_at": fetched_at,
        "fetched_at": fetched_at,
    }
    values.update(fields)
    return UserRecord(user_id, **values)  # type: ignore[arg-type]


async def test_get_many_returns_only_stored_ids(store: UserStore) -> None:
    assert await store.get_many([]) == {}
    assert await store.get_many([1, 2]) == {}
    await store.upsert_many([user(1), user(3)])
    assert sorted(await store.get_many([1, 2, 3])) == [1, 3]


async def test_a_user_round_trips_every_field(store: UserStore) -> None:
    full = user(10)
    sparse = user(
        11,
        display_name=None,
        country=None,
        city=None,
        role=None,
        registration_date=None,
        avatar_url=None,
    )
    await store.upsert_many([full, sparse])
    found = await store.get_many([10, 11])
    assert found[10] == full
    assert found[11] == sparse


async def test_an_upsert_updates_fields_but_keeps_the_first_created_at(store: UserStore) -> None:
    await store.upsert_many([user(20, fetched_at=NOW - 1000)])
    await store.upsert_many([user(20, username="renamed", fetched_at=NOW)])
    stored = (await store.get_many([20]))[20]
    assert stored.username == "renamed"
    assert stored.fetched_at == NOW
    assert stored.created_at == NOW - 1000


async def test_a_batch_of_250_saves_and_reads_back_in_one_call_each(store: UserStore) -> None:
    await store.upsert_many([user(i) for i in range(1000, 1250)])
    found = await store.get_many(list(range(1000, 1250)))
    assert len(found) == 250
    assert await store.count() == 250


async def test_delete_says_whether_the_user_was_there(store: UserStore) -> None:
    await store.upsert_many([user(30)])
    assert await store.delete(30) is True
    assert await store.delete(30) is False
    assert await store.get_many([30]) == {}
    assert await store.count() == 0


async def test_delete_fetched_before_removes_only_older_users(store: UserStore) -> None:
    await store.upsert_many([user(40, fetched_at=NOW - 500), user(41, fetched_at=NOW - 50)])
    assert await store.delete_fetched_before(NOW - 100) == 1
    assert sorted(await store.get_many([40, 41])) == [41]


async def test_fetched_before_lists_oldest_first_up_to_the_limit(store: UserStore) -> None:
    await store.upsert_many(
        [
            user(50, fetched_at=NOW - 300),
            user(51, fetched_at=NOW - 500),
            user(52, fetched_at=NOW - 400),
            user(53, fetched_at=NOW),
        ]
    )
    old = await store.fetched_before(NOW - 100, limit=2)
    assert [u.user_id for u in old] == [51, 52]
    assert [u.user_id for u in await store.fetched_before(NOW - 100, limit=10)] == [51, 52, 50]


async def test_ping_answers_when_open(store: UserStore) -> None:
    await store.ping()


@pytest.mark.parametrize("count", [0, 1])
async def test_upserting_nothing_or_one_is_fine(store: UserStore, count: int) -> None:
    await store.upsert_many([user(60)][:count])
    assert await store.count() == count


async def test_an_older_copy_never_replaces_a_newer_one(store: UserStore) -> None:
    """A late writer (a paused process whose fetch was taken over) loses to the newer copy."""
    await store.upsert_many([user(40, fetched_at=NOW, username="newer")])
    await store.upsert_many([user(40, fetched_at=NOW - 60, username="older"), user(41)])
    stored = await store.get_many([40, 41])
    assert stored[40].username == "newer"
    assert stored[40].fetched_at == NOW
    assert 41 in stored, "the rest of the batch is saved"
    await store.upsert_many([user(40, fetched_at=NOW + 60, username="newest")])
    assert (await store.get_many([40]))[40].username == "newest"
