"""A client's new-id quota and its ids a minute under concurrency: taken where the gateway
decides which ids are new, never twice, given back when another fetch answered."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import InvalidRequest, TooManyRequests
from app.gateway.coordinator import LocalCoordinator, LocalHub
from app.gateway.flight import PendingLookup
from app.gateway.gateway import Gateway
from app.http import client_limits
from app.http.auth import Client
from app.http.client_limits import WINDOW_S, ClientLimits, SlidingLog
from app.store import SqliteUserStore
from tests.support.apps import Running, StartApp, make_settings, until
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


async def test_new_ids_of_a_request_shed_as_overloaded_are_given_back_to_the_quota(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    """The gateway takes the quota before it checks its bounds: a request it then sheds
    (503) fetched nothing, so it must spend nothing of the client's new ids a minute."""
    freelancer.latency_s = 0.3
    running = await start_app(api_keys=KEYS, key_misses_per_min=10, max_waiters_per_id=1)
    first = asyncio.ensure_future(lookup(running, [1], OTHER))  # waits on id 1's fetch
    await until(lambda: (f := running.gateway.inflight.get(1)) is not None and f.waiters > 0)
    shed = await lookup(running, [1, *range(2, 11)])  # id 1 has its one waiter already
    assert shed.status_code == 503, shed.text
    assert (await first).status_code == 200
    answer = await lookup(running, list(range(2, 11)))
    assert answer.status_code == 200, answer.text
    assert answer.json()["unavailable"] == [], "nothing was fetched for the shed request"
    assert sorted(u for u in freelancer.lookups if u != 1) == list(range(2, 11))
    stats = (await running.client.get("/api/stats", headers={"X-API-Key": KEY})).json()
    usage = {row["name"]: row for row in stats["keys"]}["greedy"]
    assert (usage["misses"], usage["over_quota"]) == (9, 0)


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
        assert len(pending.started) == 4 and pending.fetched_here == 1, (
            "a's fetch answered 1, 2 and 3: given back"
        )
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
# The model keeps every take with its real time. The log keeps takes of one millisecond of
# the clock (the same floor(t * 1000)) as one entry dated by the latest of them, so a take
# counts until 60 s after the latest take of its millisecond: up to 1 ms longer than the
# real window holds it, never shorter.


def dated(takes: list[list[float]]) -> list[float]:
    """Each take's date in the log: the latest take of its millisecond."""
    latest: dict[int, float] = {}
    for at, _ in takes:
        cell = int(at * 1000)
        latest[cell] = max(latest.get(cell, at), at)
    return [latest[int(at * 1000)] for at, _ in takes]


def counted(takes: list[list[float]], now: float) -> int:
    """What the log must hold at `now`: the takes dated less than a minute ago."""
    dates = dated(takes)
    return int(sum(t[1] for t, d in zip(takes, dates, strict=True) if d > now - WINDOW_S))


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
    takes: list[list[float]] = []  # reference: [time, ids still counted], each take of 1+
    handles: list[int] = []
    for step, asked, back in steps:
        now += step
        allowed, handle = quota.take(asked, limit, now)
        assert allowed == max(0, min(asked, limit - counted(takes, now))), "what is left"
        assert (handle is None) == (allowed == 0)
        if handle is not None:
            takes.append([now, float(allowed)])
            handles.append(handle)
        if back and takes:
            index = back % len(takes)
            returned = min(back, int(takes[index][1]))
            if dated(takes)[index] > now - WINDOW_S:
                takes[index][1] -= returned
            # else forgotten by the window already: giving back changes nothing
            quota.give_back(handles[index], returned)
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
            assert counted(takes, now + wait + 1e-6) + cost <= limit, "fits once the wait is over"
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


@pytest.mark.parametrize("now", [1001.7220027435345582, 5000.1, 123456.789])
def test_retry_after_is_the_minute_when_the_room_leaves_at_the_same_instant(
    now: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests in one clock tick against a limit of 1: the room comes back in exactly
    a minute, so Retry-After says 60 (the sum `at + 60 - now` came to 60.0000000000001
    in floats, and 61 went out)."""
    monkeypatch.setattr(client_limits, "time", SimpleNamespace(monotonic=lambda: now))
    limits = ClientLimits(make_settings(tmp_path, rate_limit_per_min=1))
    client = Client("k", "read")
    limits.admit(client)
    with pytest.raises(TooManyRequests) as refused:
        limits.admit(client)
    assert refused.value.retry_after == 60
    assert refused.value.limit_headers["RateLimit"] == '"requests";r=0;t=60'


def test_address_clients_rotating_past_the_table_never_pass_their_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 addresses (more than the table keeps) asking in turn, five rounds in a minute,
    against 2 requests a minute: an address pushed out of the table while its takes are
    in the window came back with an empty log, so every address got 2 more each round.
    Now no address passes 2 in the minute, those in the table get their 2, and memory
    stays bounded."""
    clock = [5000.0]

    def monotonic() -> float:
        clock[0] += 0.001
        return clock[0]

    monkeypatch.setattr(client_limits, "time", SimpleNamespace(monotonic=monotonic))
    limits = ClientLimits(make_settings(tmp_path, rate_limit_per_min=2))
    addresses = [f"ip:10.0.{i // 256}.{i % 256}" for i in range(300)]
    admitted = dict.fromkeys(addresses, 0)
    for _ in range(5):  # 1 500 calls: 1.5 s of the clock, well inside one minute
        for name in addresses:
            try:
                limits.admit(Client(name, "admin"))
            except TooManyRequests:
                continue
            admitted[name] += 1
    assert max(admitted.values()) <= 2, "no address passes its limit in a minute"
    first = addresses[: client_limits.MAX_ADDRESS_CLIENTS]
    assert all(admitted[name] == 2 for name in first), "those kept are never refused room"
    assert len(limits._addresses) <= client_limits.MAX_ADDRESS_CLIENTS
    assert len(limits._logs) <= (client_limits.MAX_ADDRESS_CLIENTS + 1) * len(client_limits.LIMITS)


def test_an_address_counted_as_ip_star_keeps_its_count_when_it_gets_a_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past a full table a newcomer counts in the `ip:*` share; when a place frees up within
    the minute, what it took there still counts (its logs start from that share's)."""
    clock = [5000.0]
    monkeypatch.setattr(client_limits, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    limits = ClientLimits(make_settings(tmp_path, rate_limit_per_min=2))
    limits.admit(Client("ip:10.0.0.1", "admin"))  # the oldest: its place frees first
    clock[0] += 30.0
    for n in range(2, client_limits.MAX_ADDRESS_CLIENTS + 1):
        limits.admit(Client(f"ip:10.0.{n // 256}.{n % 256}", "admin"))
    newcomer = Client("ip:192.0.2.7", "admin")
    limits.admit(newcomer)
    limits.admit(newcomer)  # its 2, in the ip:* share (the table is full)
    clock[0] += 31.0  # 10.0.0.1's take has left the window: its place is free
    with pytest.raises(TooManyRequests) as refused:
        limits.admit(newcomer)
    assert refused.value.retry_after == 29, "its takes leave a minute after it made them"
    assert "ip:192.0.2.7" in limits._addresses, "it has a place now"


def test_a_batch_past_this_process_share_of_the_ids_a_minute_is_bad_input(
    tmp_path: Path,
) -> None:
    """150 ids a minute over 2 processes: 75 here, so 100 ids can never fit in this one."""
    limits = ClientLimits(make_settings(tmp_path, rate_limit_ids_per_min=150), lambda: 2)
    client = Client("k", "read")
    with pytest.raises(InvalidRequest) as refused:
        limits.admit_ids(client, 100)
    assert refused.value.status_code == 400
    assert "at most 75 ids (got 100)" in str(refused.value)
    assert "150 over the processes" in str(refused.value)
    limits.admit_ids(client, 75)  # nothing was spent by the refused batch
