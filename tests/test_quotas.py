"""A client's new-id quota and its ids a minute under concurrency: taken where the gateway
decides which ids are new, never twice, given back when another fetch answered."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.gateway.coordinator import LocalCoordinator, LocalHub
from app.gateway.flight import PendingLookup
from app.gateway.gateway import Gateway
from app.http.client_limits import WINDOW_S, SlidingLog
from app.store import SqliteUserStore
from tests.support.apps import Running, StartApp, make_settings
from tests.support.freelancer import FakeFreelancer, SlowUpstream

KEY = "quota-key-0123456789abcdef"
OTHER = "other-key-0123456789abcdef"
KEYS = f"greedy:{KEY}:read,other:{OTHER}:read"


async def lookup(running: Running, ids: list[int], secret: str = KEY) -> httpx.Response:
    return await running.client.post(
        "/api/users", json={"user_ids": ids}, headers={"X-API-Key": secret}
    )


async def test_parallel_requests_of_one_key_never_fetch_more_than_its_quota(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    freelancer.latency_s = 0.05  # every request is waiting while the others arrive
    running = await start_app(api_keys=KEYS, key_misses_per_min=40)
    batches = [list(range(1000 + 20 * i, 1020 + 20 * i)) for i in range(10)]
    answers = await asyncio.gather(*(lookup(running, ids) for ids in batches))
    bodies = [answer.json() for answer in answers]
    assert {answer.status_code for answer in answers} == {200}
    fetched = sorted(freelancer.lookups)
    assert len(fetched) == 40, "the quota of 40 new ids holds across parallel requests"
    served = sorted(u["user_id"] for body in bodies for u in body["users"])
    assert served == fetched
    quota = [uid for body in bodies for uid, why in body["errors"].items() if why == "quota"]
    assert len(quota) == 160
    stats = (await running.client.get("/api/stats", headers={"X-API-Key": KEY})).json()
    usage = {row["name"]: row for row in stats["keys"]}["greedy"]
    assert (usage["misses"], usage["over_quota"]) == (40, 160)


async def test_a_greedy_burst_cannot_fill_the_queue_for_other_clients(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    freelancer.latency_s = 0.2
    running = await start_app(api_keys=KEYS, key_misses_per_min=40, queue_max=200)
    greedy = [lookup(running, list(range(10_000 + 100 * i, 10_100 + 100 * i))) for i in range(20)]
    tasks = [asyncio.ensure_future(request) for request in greedy]
    await asyncio.sleep(0.05)  # the burst has registered what its quota allowed
    other = await lookup(running, list(range(50_000, 50_030)), OTHER)
    assert other.status_code == 200, other.text  # not 503: the burst queued only 40 ids
    assert other.json()["unavailable"] == []
    assert {t.status_code for t in await asyncio.gather(*tasks)} == {200}
    assert len([u for u in freelancer.lookups if u < 50_000]) == 40


async def test_ids_another_process_fetched_are_given_back_to_the_quota(tmp_path: Path) -> None:
    upstream = SlowUpstream(delay_s=0.1)
    hub = LocalHub()
    gateways = []
    for _ in range(2):
        gateway = Gateway(
            settings=make_settings(tmp_path),
            store=SqliteUserStore(tmp_path / "users.db"),
            upstream=upstream,
            coordinator=LocalCoordinator(hub),
        )
        await gateway.start()
        gateways.append(gateway)
    a, b = gateways
    try:
        first = asyncio.ensure_future(a.lookup([1, 2, 3]))
        await asyncio.sleep(0.02)  # a's worker has claimed 1, 2, 3 for the deployment
        pending = b.lookup_now([1, 2, 3, 4])
        assert isinstance(pending, PendingLookup)
        taken: list[int] = []

        def allow(count: int) -> int:
            taken.append(count)
            return count

        pending.allow_misses = allow
        result = await b.finish(pending)
        await first
        assert result.user_ids == [1, 2, 3, 4]
        assert taken == [4], "all four were new to b when it registered them"
        assert pending.answered_elsewhere == 3, "a's fetch answered 1, 2 and 3: given back"
        assert sorted(u for call in upstream.calls for u in call) == [1, 2, 3, 4]
    finally:
        await a.stop()
        await b.stop()


async def test_parallel_requests_of_one_key_never_pass_its_ids_a_minute(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(api_keys=KEYS, rate_limit_ids_per_min=400)
    # 20 ids a request: exactly 20 requests fit, whatever the interleaving.
    answers = await asyncio.gather(
        *(lookup(running, list(range(100 * i, 100 * i + 20))) for i in range(1, 31))
    )
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses.count(200) == 20 and statuses.count(429) == 10, statuses


# ---- the limits' arithmetic against a reference model ---------------------------------
#
# The model keeps every take with its real time. The log counts in whole milliseconds to
# the safe side: a take at t counts while `ceil(t ms) > floor(now ms) - 60 000`, so it may
# count up to 1 ms longer than the real window holds it, never shorter.

SPAN_MS = round(WINDOW_S * 1000)


def counted(takes: list[list[float]], now: float) -> int:
    """What the log must hold at `now`: the takes its rounding still counts."""
    horizon = math.floor(now * 1000) - SPAN_MS
    return int(sum(ids for at, ids in takes if math.ceil(at * 1000) > horizon and at <= now))


def real(takes: list[list[float]], now: float) -> int:
    """What the 60 s ending at `now` really held."""
    return int(sum(ids for at, ids in takes if now - WINDOW_S < at <= now))


# Fractional seconds, some steps within one millisecond (takes that share an entry).
elapsed = st.one_of(st.floats(0.0, 40.0, allow_nan=False), st.floats(0.0, 0.002))


@pytest.mark.fuzz
@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 50),
    steps=st.lists(
        st.tuples(
            elapsed,
            st.integers(0, 30),  # ids asked for
            st.integers(0, 30),  # ids of an earlier take given back
        ),
        max_size=60,
    ),
)
def test_the_quota_never_passes_its_limit_in_any_window_and_never_refuses_room(
    limit: int, steps: list[tuple[float, int, int]]
) -> None:
    """Take up to what is left, give back part of any earlier take: the log holds exactly
    what its rounding counts, and no real minute ever holds more than the limit."""
    quota = SlidingLog()
    now = 1000.0
    takes: list[list[float]] = []  # reference: [time, ids still counted]
    handles: list[int | None] = []
    for step, asked, back in steps:
        now += step
        allowed, handle = quota.take(asked, limit, now)
        assert allowed == max(0, min(asked, limit - counted(takes, now))), "what is left"
        takes.append([now, float(allowed)])
        handles.append(handle)
        if back:
            index = back % len(takes)
            returned = min(back, int(takes[index][1]))
            if handles[index] is not None and counted(takes[index:], now):
                takes[index][1] -= returned
                quota.give_back(handles[index], returned)  # type: ignore[arg-type]
            else:  # forgotten by the window already: giving back changes nothing
                quota.give_back(handles[index] or 0, returned)
        assert quota.used(now) == counted(takes, now)
        assert all(real(takes, at) <= limit for at, _ in takes), "no minute past the limit"


@pytest.mark.fuzz
@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 40),
    steps=st.lists(st.tuples(elapsed, st.integers(1, 45)), max_size=80),
)
def test_requests_and_ids_a_minute_are_exact_and_retry_after_is_when_room_comes_back(
    limit: int, steps: list[tuple[float, int]]
) -> None:
    """All or nothing (requests, ids): taken iff it fits what the window counts at `now`, so
    no real minute ever holds more than the limit, and nothing is refused once the real
    window has had room for a millisecond; the wait it names is the first instant the
    cost fits."""
    log = SlidingLog()
    now = 1000.0
    takes: list[list[float]] = []
    for step, cost in steps:
        now += step
        fits = counted(takes, now) + cost <= limit
        if real(takes, now - 0.001) + cost <= limit and not any(
            now - 0.001 < at <= now for at, _ in takes
        ):
            assert fits, "room for a millisecond is never refused"
        wait = log.wait(cost, limit, now)
        assert log.take_all(cost, limit, now) == fits
        if fits:
            assert wait == 0.0
            takes.append([now, float(cost)])
        elif cost > limit:
            assert wait == WINDOW_S, "never fits: a window's wait"
        else:
            assert 0 < wait <= WINDOW_S + 0.001
            assert counted(takes, now + wait) + cost <= limit, "fits once the wait is over"
            assert counted(takes, now + max(0.0, wait - 0.001)) + cost > limit, "not sooner"
        assert log.used(now) == counted(takes, now)
        assert all(real(takes, at) <= limit for at, _ in takes), "no minute past the limit"


def test_a_log_holds_an_entry_a_millisecond_at_most() -> None:
    """However many takes a millisecond sees, they are one entry: a client without a
    practical limit (the benchmarks lift them) keeps a log bounded by time."""
    log = SlidingLog()
    for n in range(10_000):
        assert log.take_all(1, 10**9, 5000.0 + n * 0.0001)  # 10 takes a millisecond
    assert len(log.times) <= 1_001 and log.used(5001.0) == 10_000  # 1 s: 1 000 ms, both ends
