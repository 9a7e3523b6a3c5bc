"""Every store operation, against every store."""

from __future__ import annotations

import time

import pytest

from app.domain import UserRecord
from app.gateway.cache import cache_entry
from app.store import UserStore
from tests.store.raw import save_as_before_the_json, stored_json

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


async def test_a_delete_up_to_a_fetch_time_leaves_a_newer_copy(store: UserStore) -> None:
    """Undoing the save of a copy fetched at t removes that copy, never one fetched later."""
    await store.upsert_many([user(35, fetched_at=NOW - 0.25), user(36, fetched_at=NOW)])
    assert await store.delete(35, fetched_by=NOW - 0.25) is True
    assert await store.delete(36, fetched_by=NOW - 0.25) is False
    assert sorted(await store.get_many([35, 36])) == [36]


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


def answered(record: UserRecord) -> tuple[bytes, float]:
    """What a lookup answers for `record` from memory: its JSON, and when it was fetched."""
    return record.rendered(), record.fetched_at


async def test_a_stored_user_answers_exactly_what_memory_would(store: UserStore) -> None:
    full = user(10)
    sparse = user(11, display_name=None, city=None, registration_date=None, avatar_url=None)
    foreign = user(12, username="zoë_☃", display_name='A "quoted" \\ name', city="Zürich")
    await store.upsert_many([full, sparse, foreign])
    assert await store.get_rendered([]) == {}
    found = await store.get_rendered([10, 11, 12, 13])
    assert found == {10: answered(full), 11: answered(sparse), 12: answered(foreign)}
    assert found[12][0] == cache_entry(foreign)[0] + b"}", "the very bytes memory holds"


async def test_a_user_stored_before_the_json_was_kept_still_answers(store: UserStore) -> None:
    old = user(30, created_at=NOW - 5000.25, fetched_at=NOW - 100.5)
    await save_as_before_the_json(store, old)
    assert await stored_json(store, 30) is None
    assert await store.get_rendered([30]) == {30: answered(old)}
    refreshed = user(30, username="renamed", created_at=NOW - 5001, fetched_at=NOW)
    await store.upsert_many([refreshed])  # the next save, showing the same second, keeps it
    assert await stored_json(store, 30) == refreshed.rendered()
    assert await store.get_rendered([30]) == {30: answered(refreshed)}


async def test_a_changed_user_s_json_is_replaced_on_save_and_keeps_created_at(
    store: UserStore,
) -> None:
    first = user(40, fetched_at=NOW - 1000, created_at=NOW - 1000.5)
    await store.upsert_many([first])
    # A refresh carries the created_at memory showed (whole seconds): the same JSON.
    renamed = user(40, username="renamed", city="Mombasa", fetched_at=NOW, created_at=NOW - 1001)
    await store.upsert_many([renamed])
    assert await store.get_rendered([40]) == {40: answered(renamed)}
    assert await stored_json(store, 40) == renamed.rendered()
    # A writer that did not know the user shows another created_at: the stored one is
    # kept, and so is what the store answers (rendered from the fields).
    stranger = user(40, username="again", fetched_at=NOW + 10, created_at=NOW + 10)
    await store.upsert_many([stranger])
    kept = stranger._replace(created_at=NOW - 1000.5)
    assert await store.get_rendered([40]) == {40: answered(kept)}
    assert (await store.get_many([40]))[40].created_at == NOW - 1000.5
    # Its next save by a writer that knows created_at keeps the JSON again.
    again = user(40, username="again", fetched_at=NOW + 20, created_at=NOW - 1001)
    await store.upsert_many([again])
    assert await stored_json(store, 40) == again.rendered()


async def test_an_older_copy_never_replaces_a_newer_one_s_json(store: UserStore) -> None:
    newer = user(50, username="newer", fetched_at=NOW)
    await store.upsert_many([newer])
    await store.upsert_many([user(50, username="older", fetched_at=NOW - 60, created_at=NOW)])
    assert await store.get_rendered([50]) == {50: answered(newer)}


async def test_get_rendered_reads_a_batch_of_250(store: UserStore) -> None:
    users = [user(i) for i in range(1000, 1250)]
    await store.upsert_many(users)
    found = await store.get_rendered(list(range(1000, 1260)))
    assert found == {u.user_id: answered(u) for u in users}
