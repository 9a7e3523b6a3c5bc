"""The `Coordinator` contract, and gateways that share one deployment through it.

`pair` yields two coordinators of one deployment, opened, with the events each received.
Every implementation runs the same contract: today the in-memory `LocalCoordinator`
(two members of one `LocalHub`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
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
from app.upstream import UpstreamBatch
from tests.conftest import make_settings


@dataclass
class Member:
    """One process's coordinator and what it was told."""

    coordinator: Coordinator
    events: list[Event] = field(default_factory=list)


@pytest.fixture(params=["local"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Member, Member]]:
    hub = LocalHub()
    members = (Member(LocalCoordinator(hub)), Member(LocalCoordinator(hub)))
    for member in members:
        await member.coordinator.open(member.events.append)
    yield members
    for member in members:
        await member.coordinator.close()


def user(uid: int) -> UserRecord:
    return UserRecord(uid, f"user{uid}", created_at=1.0, fetched_at=2.0)


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
    outcomes: dict[int, Outcome] = {1: cache_entry(user(1)), 2: NOT_FOUND, 3: failure}
    await a.coordinator.announce(outcomes)
    assert b.events == [Fetched(outcomes)]
    assert a.events == [], "a member is not told what it announced itself"
    assert await b.coordinator.claim([1, 2, 3]) == [1, 2, 3]


async def test_cache_changes_reach_the_others(pair: tuple[Member, Member]) -> None:
    a, b = pair
    await a.coordinator.publish(Evicted((7,)))
    await b.coordinator.publish(ExpiredBefore(123.0))
    assert b.events == [Evicted((7,))]
    assert a.events == [ExpiredBefore(123.0)]


async def test_a_member_that_stops_abandons_its_claims_to_the_others(
    pair: tuple[Member, Member],
) -> None:
    a, b = pair
    await a.coordinator.claim([5, 6])
    assert await b.coordinator.claim([5, 6]) == []
    await a.coordinator.close()
    assert b.events == [Abandoned((5, 6))]
    assert await b.coordinator.claim([5, 6]) == [5, 6]


@dataclass
class SlowUpstream:
    """Answers every id after `delay_s`, recording the ids of each call."""

    delay_s: float = 0.05
    calls: list[list[int]] = field(default_factory=list)

    async def fetch_users(self, user_ids: Sequence[int]) -> UpstreamBatch:
        self.calls.append(list(user_ids))
        await asyncio.sleep(self.delay_s)
        return UpstreamBatch({uid: user(uid) for uid in user_ids if uid % 97})


async def two_gateways(
    tmp_path: Path, upstream: SlowUpstream, **overrides: float
) -> tuple[Gateway, Gateway]:
    """Two gateways on one store and one hub: two processes of one deployment."""
    hub = LocalHub()
    gateways = []
    for _ in range(2):
        gateway = Gateway(
            settings=make_settings(tmp_path, **overrides),
            store=SqliteUserStore(tmp_path / "users.db"),
            upstream=upstream,
            coordinator=LocalCoordinator(hub),
        )
        await gateway.start()
        gateways.append(gateway)
    return gateways[0], gateways[1]


async def test_two_gateways_of_one_deployment_fetch_each_id_once(tmp_path: Path) -> None:
    upstream = SlowUpstream()
    a, b = await two_gateways(tmp_path, upstream)
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
        assert await a.wait_idle(5) and await b.wait_idle(5)  # saved, then announced
        # Each gateway learnt the other's users from its announcements, without a store read.
        assert len(a.memory) == len(b.memory) == len(looked_up) - 2  # 97 and 194 do not exist
        assert (await a.lookup([97])).not_found == [97]
        assert len(upstream.calls) == len({*map(tuple, upstream.calls)})
    finally:
        await a.stop()
        await b.stop()


async def test_an_eviction_on_one_gateway_reaches_the_others_memory(tmp_path: Path) -> None:
    upstream = SlowUpstream(delay_s=0)
    a, b = await two_gateways(tmp_path, upstream)
    try:
        await a.lookup([5])
        assert await a.wait_idle(5)  # saved, then announced
        assert len(b.memory) == 1, "b learnt the user from a's announcement"
        assert await b.admin.evict(5)
        assert len(a.memory) == 0
        await a.lookup([5])
        assert [call for call in upstream.calls if 5 in call] == [[5], [5]]
    finally:
        await a.stop()
        await b.stop()


async def test_ids_a_stopping_gateway_was_fetching_are_taken_over(tmp_path: Path) -> None:
    upstream = SlowUpstream(delay_s=0.2)
    a, b = await two_gateways(tmp_path, upstream, shutdown_grace_s=0)
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
