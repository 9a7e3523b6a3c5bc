"""A job shares Freelancer with waiting clients: it leaves them budget and slots, paces
itself to the hour, and still gets its share under a flood of clients. The long runs use
the real gateway and job runner on a virtual clock (`tests.support.simulation`), counting
calls at the fake Freelancer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app.gateway.batching import PRIORITY_JOB
from tests.support.apps import StartApp, until
from tests.support.freelancer import FakeFreelancer
from tests.support.jobs import submit, wait_for
from tests.support.simulation import JOB_IDS, Simulation, busiest, clients, simulate


async def test_a_job_bursts_then_paces_to_the_hour_and_a_client_still_calls_at_once(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    # 20 calls an hour, 3 kept for clients: jobs pace at 17 an hour, 6 back to back.
    running = await start_app(
        upstream_rate_per_min=1000,
        upstream_rate_per_hour=20,
        upstream_reserve_per_hour=3,
        upstream_burst=6,
        batch_size=10,
    )
    job = await submit(running, {"user_ids": list(range(1, 501))})
    await until(lambda: len(freelancer.calls) >= 6)
    state = await wait_for(running, job["job_id"], ("running",), done=60)
    assert len(freelancer.calls) == 6, "the burst, then the pace holds it"
    # 44 calls to go at one per 212 s: hours, from the planner's numbers.
    assert state["eta_s"] > 2 * 3600
    answer = await running.lookup(9_999)
    assert answer["users"][0]["source"] == "fetched"
    assert len(freelancer.calls) == 7, "a client's miss is not paced"
    health = (await running.client.get("/")).json()
    hour = next(w for w in health["budget"] if w["name"] == "hour")
    assert (hour["limit"], hour["used"], hour["remaining"]) == (20, 7, 13)
    [waiting] = health["budget_waiting"]  # GET / says which lane waits, for what, how long
    assert (waiting["lane"], waiting["waits_for"]) == ("jobs", "pace")
    assert 100 < waiting["in_s"] <= 212
    stats = (await running.client.get("/api/stats")).json()
    assert [(w["lane"], w["waits_for"]) for w in stats["budget_waiting"]] == [("jobs", "pace")]


async def test_a_waiting_client_does_not_queue_behind_a_job(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(upstream_concurrency=2)
    freelancer.latency_s = 0.3
    job = await submit(running, {"user_ids": list(range(1, 2001))})
    await asyncio.wait_for(freelancer.arrived.wait(), 5)
    answer = await running.lookup(77_777)
    assert answer["users"][0]["source"] == "fetched"
    # The job holds one of the two slots: the client's call went out beside its first
    # batch, not after the 20 it has queued up.
    assert len(freelancer.calls) <= 3
    state = (await running.client.get(f"/api/jobs/{job['job_id']}")).json()
    assert state["done"] <= 200


async def test_a_queue_full_of_clients_misses_does_not_keep_an_owed_job_out_of_line(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(queue_max=300, upstream_concurrency=2, key_misses_per_min=1000)
    queue = running.gateway.queue
    freelancer.gate = asyncio.Event()
    lookups = []
    for n in range(1, 6):  # two batches in the air, then a full queue
        body = {"user_ids": list(range(n * 100 - 99, n * 100 + 1))}
        lookups.append(asyncio.create_task(running.client.post("/api/users", json=body)))
        await until(lambda: running.gateway.processing_count == len(lookups) * 100)
    assert queue.room == 0 and len(freelancer.calls) == 2
    await submit(running, {"user_ids": list(range(10_001, 10_101))})
    # The job's chunk joins the line though clients filled the queue: jobs had none of
    # the calls, so it is owed its share and goes next.
    await until(lambda: queue.qsize(PRIORITY_JOB) == 100)
    freelancer.gate.set()
    answers = await asyncio.gather(*lookups)
    assert all(answer.status_code == 200 for answer in answers)
    assert freelancer.calls[2][0] == 10_001, [call[0] for call in freelancer.calls]


async def test_jobs_of_higher_priority_go_first_and_equals_take_turns(
    start_app: StartApp, freelancer: FakeFreelancer
) -> None:
    running = await start_app(upstream_concurrency=2, batch_size=10)
    freelancer.gate = asyncio.Event()
    blocker = await submit(running, {"user_ids": [1]})
    await asyncio.wait_for(freelancer.arrived.wait(), 5)  # the lane is busy
    low = await submit(running, {"user_ids": list(range(1000, 1030)), "priority": "low"})
    a = await submit(running, {"user_ids": list(range(2000, 2030))})
    b = await submit(running, {"user_ids": list(range(3000, 3030))})
    freelancer.gate.set()
    for job in (blocker, a, b, low):
        await wait_for(running, job["job_id"])
    order = [call[0] // 1000 for call in freelancer.calls[1:]]
    assert order[:6] == [2, 3, 2, 3, 2, 3], order
    assert order[6:] == [1, 1, 1], "the low-priority job went last"


def test_with_the_defaults_clients_get_fifty_calls_in_the_first_minute(tmp_path: Path) -> None:
    async def scenario(sim: Simulation) -> None:
        # 60 lookups of 100 new ids at once: 60 calls wanted, at the start of an hour.
        started = sim.now
        await asyncio.gather(*(sim.miss(range(i * 100 + 1, i * 100 + 101)) for i in range(60)))
        assert sim.freelancer.times() and sim.freelancer.times()[0] >= started

    sim = simulate(tmp_path, scenario)
    times = sim.freelancer.times()
    first = times[0]
    assert sum(1 for t in times if t < first + 60) == 50, "the old budget held them to 16.5"
    assert len(times) == 60 and busiest(times, 60.0) == 50
    # The 10 left wait for the first call to leave the minute and its 1 s margin.
    assert 61.0 <= max(sim.miss_waits) <= 62.0


@pytest.mark.sim
def test_a_crawl_is_paced_to_the_hour_and_keeps_the_reserve(tmp_path: Path) -> None:
    async def scenario(sim: Simulation) -> None:
        await sim.submit_job(JOB_IDS, 1_000_000)
        await asyncio.sleep(1200)
        started = sim.now
        await sim.miss([7])  # a client arriving mid-crawl finds the minute's reserve
        assert sim.now - started < 0.2

    sim = simulate(tmp_path, scenario)
    jobs = sim.freelancer.times("jobs")
    # 10 back to back, then one every 4.5 s (800 an hour): 278 in 20 minutes, not 800.
    assert 270 <= len(jobs) <= 278
    assert busiest(jobs, 60.0) <= 40, "the minute's reserve of 10 is kept"
    assert busiest(jobs, 600.0) <= 10 + 134


@pytest.mark.sim
def test_an_owed_job_gets_its_share_of_every_hour_under_a_client_flood(tmp_path: Path) -> None:
    """Clients want twice the minute's calls for two hours and a half, and fill the queue;
    a job arrives after their first minute. In every hour-long span from its second hour
    on, the job had its JOB_SHARE (20 %) of the calls (less the one call a strict share
    allows), and clients had all the rest. (A tenth of the default limits, for speed: the
    share and the windows are the same arithmetic.)"""
    submitted: list[float] = []

    async def scenario(sim: Simulation) -> None:
        # 2 lookups of 100 new ids every 5 s: 24 calls a minute wanted.
        flood = asyncio.create_task(clients(sim, 9000, every_s=5, size=2))
        await asyncio.sleep(60)  # the clients alone first: the hour holds 10 of theirs
        submitted.append(sim.now)
        await sim.submit_job(JOB_IDS, 1_000_000)
        await asyncio.sleep(2 * 3600)
        flood.cancel()

    sim = simulate(
        tmp_path,
        scenario,
        upstream_rate_per_min=10,
        upstream_rate_per_hour=100,
        upstream_reserve_per_min=2,
        upstream_reserve_per_hour=20,
        upstream_burst=2,
        queue_max=5000,
        wait_timeout_s=300,
    )
    assert sim.shed > 0, "the clients filled the queue"
    times = sim.freelancer.times()
    assert busiest(times, 60.0) <= 10 and busiest(times, 3600.0) <= 100
    start = submitted[0]
    calls = [(at, lane) for at, lane in sim.freelancer.lanes() if at >= start]
    ends = [at for at, _ in calls if at >= start + 3600]
    assert len(ends) >= 90, "a second hour of calls"
    for end in ends:
        span = [lane for at, lane in calls if end - 3600 < at <= end]
        jobs = span.count("jobs")
        assert jobs >= 0.2 * len(span) - 1, (end, jobs, len(span))
        assert span.count("misses") == len(span) - jobs, "no refreshes: clients had the rest"
