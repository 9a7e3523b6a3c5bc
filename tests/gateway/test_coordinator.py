"""The `Coordinator` contract, and gateways that share one deployment through it.

`pair` yields two coordinators of one deployment, opened, with the events each received.
Every implementation runs the same contract: today the in-memory `LocalCoordinator`
(two members of one `LocalHub`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app.domain import UserRecord
from app.gateway import Gateway
from app.gateway.cache import cache_entry
from app.gateway.coordinator import (
    Abandoned,
    Coordinator,
    Event,
    Evicted,
    ExpiredBefore,
    Fetched,
    LocalCoordinator,
    LocalHub,
)
from app.gateway.results import NOT_FOUND, Failure, Outcome
from app.store import SqliteUserStore
from tests.support.apps import make_settings, until
from tests.support.freelancer import SlowUpstream, stub_user
from tests.support.procs import RedisServer


@dataclass
class Member:
    """One process's coordinator and what it was told."""

    coordinator: Coordinator
    events: list[Event] = field(default_factory=list)


def redis_coordinator(url: str, *, lease_s: float = 5.0) -> Coordinator:
    from app.coordination.client import connect
    from app.coordination.redis_coordinator import RedisCoordinator

    return RedisCoordinator(connect(url, 1.0), prefix="test", lease_s=lease_s, timeout_s=1.0)


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Member, Member]]:
    """Two coordinators of one deployment: a shared LocalHub, or one real redis-server."""
    if request.param == "local":
        hub = LocalHub()
        members = (Member(LocalCoordinator(hub)), Member(LocalCoordinator(hub)))
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        members = (Member(redis_coordinator(server.url)), Member(redis_coordinator(server.url)))
    for member in members:
        await member.coordinator.open(member.events.append)
    yield members
    for member in members:
        await member.coordinator.close()


async def delivered(member: Member, count: int) -> None:
    """Wait (bounded) until `member` has received `count` events: Redis delivers later."""
    await until(lambda: len(member.events) >= count, within_s=5)


async def test_each_id_is_claimed_by_one_member_only(pair: tuple[Member, Member]) -> None:
    a, b = pair
    assert await a.coordinator.claim([1, 2, 3]) == [1, 2, 3]
    assert await b.coordinator.claim([2, 3, 4]) == [4]
    assert await a.coordinator.claim([4]) == []


async def test_an_announcement_reaches_the_others_and_releases_the_claims(
    pair: tuple[Member, Member],
) -> None:
    a, b = pair
    await a.coordinator.claim([1, 2, 3])
    failure = Failure("upstream_error", "500")
    outcomes: dict[int, Outcome] = {1: cache_entry(stub_user(1)), 2: NOT_FOUND, 3: failure}
    await a.coordinator.announce(outcomes)
    await delivered(b, 1)
    assert b.events == [Fetched(outcomes)]
    assert a.events == [], "a member is not told what it announced itself"
    # The claims are released: each id is b's to fetch, or its outcome comes with the claim.
    b.events.clear()
    mine = await b.coordinator.claim([1, 2, 3])
    told = {uid for event in b.events if isinstance(event, Fetched) for uid in event.outcomes}
    assert set(mine) | told == {1, 2, 3}


async def test_cache_changes_reach_the_others(pair: tuple[Member, Member]) -> None:
    a, b = pair
    await a.coordinator.publish(Evicted((7,)))
    await b.coordinator.publish(ExpiredBefore(123.0))
    await delivered(a, 1)
    await delivered(b, 1)
    assert b.events == [Evicted((7,))]
    assert a.events == [ExpiredBefore(123.0)]


async def test_a_member_that_stops_abandons_its_claims_to_the_others(
    pair: tuple[Member, Member],
) -> None:
    a, b = pair
    await a.coordinator.claim([5, 6])
    assert await b.coordinator.claim([5, 6]) == []
    await a.coordinator.close()
    await delivered(b, 1)
    assert Abandoned((5, 6)) in b.events
    assert await b.coordinator.claim([5, 6]) == [5, 6]


async def test_a_claim_just_after_an_announcement_gets_the_outcome_not_the_id(
    pair: tuple[Member, Member],
) -> None:
    """No lost wake-up: a member that missed the announcement learns it from its claim."""
    a, b = pair
    await a.coordinator.claim([8])
    await a.coordinator.announce({8: cache_entry(stub_user(8))})
    b.events.clear()
    mine = await b.coordinator.claim([8])
    if mine == [8]:  # in-process: the hub already told b; nothing is kept after release
        assert isinstance(a.coordinator, LocalCoordinator)
    else:
        assert mine == []
        assert b.events == [Fetched({8: cache_entry(stub_user(8))})]


async def test_a_named_lease_has_one_holder_and_only_its_holder_gives_it_back(
    pair: tuple[Member, Member],
) -> None:
    a, b = pair
    token = await a.coordinator.hold("webhook:j1", 30)
    assert token is not None
    assert await b.coordinator.hold("webhook:j1", 30) is None
    assert await a.coordinator.holds("webhook:j1", token)
    await b.coordinator.drop("webhook:j1", "not-the-token")
    assert not await b.coordinator.holds("webhook:j1", "not-the-token")
    assert await a.coordinator.holds("webhook:j1", token), "another's token drops nothing"
    await a.coordinator.drop("webhook:j1", token)
    assert await b.coordinator.hold("webhook:j1", 30) is not None
    short = await a.coordinator.hold("webhook:j2", 0.2)
    assert short is not None
    await asyncio.sleep(0.3)
    assert not await a.coordinator.holds("webhook:j2", short), "it lapses"
    assert await b.coordinator.hold("webhook:j2", 30) is not None


MakeCoordinator = Callable[[], Coordinator]


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
def deployment(request: pytest.FixtureRequest) -> MakeCoordinator:
    """Coordinators of one deployment: on one LocalHub, or on one real redis-server."""
    if request.param == "local":
        hub = LocalHub()
        return lambda: LocalCoordinator(hub)
    server: RedisServer = request.getfixturevalue("redis_server")
    return lambda: redis_coordinator(server.url)


async def two_gateways(
    tmp_path: Path, upstream: SlowUpstream, deployment: MakeCoordinator, **overrides: float
) -> tuple[Gateway, Gateway]:
    """Two gateways on one store and one deployment: two processes of one gateway."""
    gateways = []
    for _ in range(2):
        gateway = Gateway(
            settings=make_settings(tmp_path, **overrides),
            store=SqliteUserStore(tmp_path / "users.db"),
            upstream=upstream,
            coordinator=deployment(),
        )
        await gateway.start()
        gateways.append(gateway)
    return gateways[0], gateways[1]


async def test_two_gateways_of_one_deployment_fetch_each_id_once(
    tmp_path: Path, deployment: MakeCoordinator
) -> None:
    upstream = SlowUpstream()
    a, b = await two_gateways(tmp_path, upstream, deployment)
    try:
        batches = [list(range(i, i + 30)) for i in range(1, 200, 10)]
        results = await asyncio.gather(
            *(gateway.lookup(ids) for ids in batches for gateway in (a, b))
        )
        requests = [ids for ids in batches for _ in (a, b)]
        for ids, result in zip(requests, results, strict=True):
            assert result.user_ids == [i for i in ids if i % 97]
            assert result.not_found == [i for i in ids if not i % 97]
            assert result.unavailable == []
        looked_up = [uid for call in upstream.calls for uid in call]
        assert sorted(looked_up) == sorted({i for ids in batches for i in ids}), (
            "each id is looked up once across both gateways"
        )
        assert len(upstream.calls) <= 10
        assert await a.wait_idle(5) and await b.wait_idle(5)  # announced, then saved
        # Each gateway learnt the other's users from its announcements, without a store read.
        found = len(looked_up) - 2  # 97 and 194 do not exist
        await until(lambda: len(a.memory) == len(b.memory) == found)
        assert (await a.lookup([97])).not_found == [97]
        assert len(upstream.calls) == len({*map(tuple, upstream.calls)})
    finally:
        await a.stop()
        await b.stop()


async def test_an_eviction_on_one_gateway_reaches_the_others_memory(
    tmp_path: Path, deployment: MakeCoordinator
) -> None:
    upstream = SlowUpstream(delay_s=0)
    a, b = await two_gateways(tmp_path, upstream, deployment)
    try:
        await a.lookup([5])
        assert await a.wait_idle(5)  # announced, then saved
        await b.lookup([5])  # b's clients asked for it too: b holds it
        assert len(b.memory) == 1
        assert await b.admin.evict(5)
        await until(lambda: len(a.memory) == 0)
        await a.lookup([5])
        assert [call for call in upstream.calls if 5 in call] == [[5], [5]]
    finally:
        await a.stop()
        await b.stop()


async def test_ids_a_stopping_gateway_was_fetching_are_taken_over(
    tmp_path: Path, deployment: MakeCoordinator
) -> None:
    upstream = SlowUpstream(delay_s=0.2)
    a, b = await two_gateways(tmp_path, upstream, deployment, shutdown_grace_s=0)
    try:
        first = asyncio.create_task(a.lookup([11, 12]))
        await asyncio.sleep(0.05)  # a has claimed 11 and 12 and is calling upstream
        waiting = asyncio.create_task(b.lookup([11, 12]))
        await asyncio.sleep(0.05)  # b waits for a's announcement
        await a.stop()  # a's fetch is abandoned: b claims the ids and fetches them itself
        result = await asyncio.wait_for(waiting, 5)
        assert result.user_ids == [11, 12]
        assert (await first).errors == {"11": "shutdown", "12": "shutdown"}
        assert upstream.calls == [[11, 12], [11, 12]]
    finally:
        await b.stop()


async def test_an_abandoned_id_the_store_already_has_is_answered_without_a_fetch(
    tmp_path: Path,
) -> None:
    """After a gap (a lost subscription, a dead fetcher), the store is checked first."""
    upstream = SlowUpstream(delay_s=1.0)
    hub = LocalHub()
    a, b = await two_gateways(tmp_path, upstream, lambda: LocalCoordinator(hub))
    try:
        fetching = asyncio.create_task(a.lookup([21]))
        await until(lambda: len(upstream.calls) == 1)  # a holds 21
        waiting = asyncio.create_task(b.lookup([21]))
        await asyncio.sleep(0.05)  # b waits on a
        now = time.time()
        await b.store.upsert_many([UserRecord(21, "saved", created_at=now, fetched_at=now)])
        assert isinstance(b.coordinator, LocalCoordinator) and b.coordinator.listener
        b.coordinator.listener(Abandoned((21,)))  # as after a gap in b's subscription
        result = await asyncio.wait_for(waiting, 2)
        assert result.user_ids == [21]
        assert len(upstream.calls) == 1, "answered from the store, not fetched again"
        await fetching
    finally:
        await a.stop()
        await b.stop()
