"""The chaos harness's checker and schedule: each promise is caught broken on a made-up
history, and let through where the history names a fault that allows it."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import orjson
import pytest

from app.simulator.users import synthetic_user
from tests.chaos import history
from tests.chaos.checker import Broken, RunData, check
from tests.chaos.cluster import FaultRecord
from tests.chaos.load import Answer, Eviction, JobSubmission
from tests.chaos.receiver import Delivery
from tests.chaos.schedule import KINDS, Fault, Kind, make_schedule
from tests.chaos.table import render

T0 = 1_800_000_000.0
PIDS = {101: "A", 102: "B", 201: "W", 202: "W"}


def call(at: float, ids: list[int], pid: int) -> dict[str, Any]:
    return {"t": T0 + at, "done": T0 + at + 0.05, "ids": ids, "status": 200, "pid": pid}


def data(**changes: Any) -> RunData:
    values: dict[str, Any] = {
        "seed": 1,
        "chaos_start": T0,
        "chaos_end": T0 + 100,
        "faults": [],
        "ledger": [],
        "answers": [],
        "evictions": [],
        "jobs": [],
        "job_views": {},
        "deliveries": [],
        "memory": {},
        "leases_idle": {},
        "leases_later": {},
        "pids": PIDS,
        "dead": {},
        "coordinated": None,
    }
    values.update(changes)
    return RunData(**values)


def fault(
    kind: Kind,
    target: str | None,
    at: float,
    for_s: float,
    pids: tuple[int, ...] = (),
    delay_s: float = 0.4,
) -> FaultRecord:
    """A fault as it happened, `at` seconds after T0."""
    return FaultRecord(Fault(kind, target, at, for_s, delay_s), T0 + at, T0 + at + for_s, pids)


def answer(
    n: int, server: str, ids: list[int], start: float, took: float = 0.1, **kw: Any
) -> Answer:
    found = Answer(n, "lookup", server, ids, T0 + start, T0 + start + took, 200)
    for uid in ids:
        user = synthetic_user(uid)
        if user is None:
            found.not_found.append(uid)
        else:
            found.users[uid] = ("cache", T0 - 10, user["username"])
    for name, value in kw.items():
        setattr(found, name, value)
    return found


def promises(broken: list[Broken]) -> list[str]:
    return [b.promise for b in broken]


def test_an_id_fetched_twice_with_no_fault_is_caught() -> None:
    report = check(data(ledger=[call(10, [5], 101), call(20, [5], 102)]))
    assert promises(report.broken) == ["one fetch per id"]
    assert report.rows[0].dups_unexplained == 1


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (fault("link-cut", "B", 18, 3), "cut off from Redis (link-cut B)"),
        (fault("link-cut", "A", 14, 3), "cut off from Redis (link-cut A)"),
        (fault("kill", "A", 12, 1, pids=(101,)), "owner death (kill)"),
        (fault("pause", "B", 15, 2, pids=(102,)), "paused process"),
        (fault("redis-freeze", None, 14, 2), "Redis gone (redis-freeze)"),
        (fault("link-delay", "B", 17, 2), "cut off from Redis (link-delay B)"),
    ],
)
def test_a_second_fetch_is_allowed_only_by_a_named_fault(record: FaultRecord, reason: str) -> None:
    report = check(data(ledger=[call(10, [5], 101), call(20, [5], 102)], faults=[record]))
    assert report.broken == []
    assert report.duplicates[0][1].startswith(reason)


def test_faults_that_do_not_allow_a_second_fetch_do_not_excuse_it() -> None:
    faults = [
        fault("pubsub-kill", None, 19, 0),
        fault("link-cut", "W", 18, 3),  # neither caller's link
        fault("kill", "B", 12, 1, pids=(102,)),  # the second caller, not the owner
        fault("kill", "A", 17, 1, pids=(101,)),  # the owner, but long after its save
        fault("link-cut", "B", 5, 3),  # over before the second call
        fault("link-cut", "A", 40, 3),  # after both calls
    ]
    report = check(data(ledger=[call(10, [5], 101), call(20, [5], 102)], faults=faults))
    assert promises(report.broken) == ["one fetch per id"]


def test_an_eviction_between_two_fetches_allows_the_second() -> None:
    eviction = Eviction(5, "A", T0 + 15, T0 + 15.1, 200)
    report = check(data(ledger=[call(10, [5], 101), call(20, [5], 102)], evictions=[eviction]))
    assert report.broken == []


def test_a_budget_window_over_its_limit_is_caught_unless_a_process_was_cut_off() -> None:
    ledger = [call(i * 1.5, [1000 + i], 101) for i in range(31)]  # 31 calls in 45 s
    assert promises(check(data(ledger=ledger)).broken) == ["budget window"]
    cut = fault("link-cut", "B", 20, 5)
    assert check(data(ledger=ledger, faults=[cut])).broken == []
    ledger += [call(45 + i * 0.1, [2000 + i], 102) for i in range(8)]  # 39: over the share
    report = check(data(ledger=ledger, faults=[cut]))
    assert promises(report.broken) == ["budget window"]
    assert report.rows[-1].budget_peak == 39, "the peak is counted past the first finding"
    second = fault("link-silence", "W", 30, 5)  # two processes cut off: two shares
    assert check(data(ledger=ledger, faults=[cut, second])).broken == []


def test_late_answers_and_5xx_are_caught_unless_the_process_asked_was_stopped() -> None:
    late = answer(1, "B", [1], 10, took=8.0)
    error = answer(2, "A", [2], 10, status=500)
    lost = answer(3, "W", [3], 10, error="ReadTimeout", status=None)
    shed = answer(4, "A", [4], 10, status=503)
    report = check(data(answers=[late, error, lost, shed]))
    assert len(report.broken) == 3
    assert report.rows[0].status_503 == 1
    paused = [fault("pause", "B", 12, 3), fault("kill", "W", 9.5, 1)]
    report = check(data(answers=[late, lost], faults=paused))
    assert report.broken == []
    assert report.rows[1].excused + report.rows[2].excused == 2


def test_a_wrong_or_incomplete_answer_is_caught() -> None:
    wrong = answer(1, "A", [1, 2], 10)
    wrong.users[2] = ("cache", T0, "someone-else")
    missing = answer(2, "A", [3, 4], 10)
    del missing.users[4]
    invented = answer(3, "A", [5], 10)
    invented.not_found.append(5)
    del invented.users[5]
    report = check(data(answers=[wrong, missing, invented]))
    assert promises(report.broken) == ["every answer right"] * 3


def test_an_eviction_not_seen_in_time_is_caught() -> None:
    eviction = Eviction(7, "A", T0 + 10, T0 + 10.1, 200)
    # B serves its copy from before the eviction 3 s later, and nobody fetched 7 again.
    stale = answer(1, "B", [7], 13)
    report = check(data(evictions=[eviction], answers=[stale], ledger=[call(1, [7], 101)]))
    assert promises(report.broken) == ["an eviction reaches every process"]
    # A copy fetched after the eviction is fine.
    fresh = answer(1, "B", [7], 13)
    fresh.users[7] = ("fetched", T0 + 11, fresh.users[7][2])
    later = [call(1, [7], 101), call(11, [7], 102)]
    assert check(data(evictions=[eviction], answers=[fresh], ledger=later)).broken == []
    # B cut off from Redis meanwhile: it has until 6 s after the link is back.
    cut = fault("link-cut", "B", 9, 3)
    assert check(data(evictions=[eviction], answers=[stale], faults=[cut])).broken == []


def test_leases_left_by_live_processes_or_never_lapsing_are_caught() -> None:
    idle = {"fl:{5}:lease": ("101-ab.3", 1500), "fl:{6}:lease": ("102-cd.1", 900)}
    report = check(data(leases_idle=idle, dead={102: T0 + 50}))
    assert [b.detail.split()[0] for b in report.broken] == ["fl:{5}:lease"]
    report = check(data(leases_later={"fl:{6}:lease": ("102-cd.1", 900)}))
    assert promises(report.broken) == ["no lease outlives its owner's fetch"]


def test_memory_holding_more_users_than_clients_were_answered_is_caught() -> None:
    answers = [answer(1, "A", [1, 2, 3], 10)]
    assert check(data(answers=answers, memory={"A": [3, 3]})).broken == []
    report = check(data(answers=answers, memory={"A": [3, 2000]}))
    assert promises(report.broken) == ["a crawl does not grow other processes' memory"]


def test_callbacks_once_signed_with_one_key_or_at_least_once_under_a_fault() -> None:
    job = JobSubmission("j1", "A", T0 + 5, 10)
    views = {"j1": {"status": "completed", "done": 10}}
    once = [Delivery(T0 + 30, "j1", "j1.1", True, "completed")]
    assert check(data(jobs=[job], job_views=views, deliveries=once)).broken == []
    twice = [*once, Delivery(T0 + 31, "j1", "j1.1", True, "completed")]
    report = check(data(jobs=[job], job_views=views, deliveries=twice))
    assert promises(report.broken) == ["a callback once per deployment"]
    paused = [fault("pause", "W", 29, 2)]
    assert check(data(jobs=[job], job_views=views, deliveries=twice, faults=paused)).broken == []
    rekeyed = [*once, Delivery(T0 + 31, "j1", "j1.2", False, "completed")]
    report = check(data(jobs=[job], job_views=views, deliveries=rekeyed, faults=paused))
    assert promises(report.broken) == ["callback delivered"]
    report = check(data(jobs=[job], job_views={"j1": {"status": "running", "done": 4}}))
    assert promises(report.broken) == ["a crawl finishes", "callback delivered"]


def test_the_report_has_a_row_per_fault_and_says_what_broke() -> None:
    faults = [fault("link-cut", "B", 18, 3), fault("pubsub-kill", None, 30, 0)]
    report = check(data(ledger=[call(10, [5], 101), call(35, [5], 102)], faults=faults))
    text = render(report)
    assert "link-cut" in text and "pubsub-kill" in text
    assert "BROKEN: 1 promise violations" in text and "one fetch per id" in text


def test_the_same_seed_gives_the_same_schedule() -> None:
    first = make_schedule(7, 120)
    assert first == make_schedule(7, 120)
    assert first != make_schedule(8, 120)
    assert all(b.at_s >= a.at_s + a.for_s + 3 for a, b in itertools.pairwise(first))
    assert first[-1].at_s + first[-1].for_s <= 120
    assert {f.kind for f in first} == set(KINDS)  # a round of every kind, and more
    assert all(f.for_s <= 3.0 for f in first if f.kind == "pause" and f.target == "W")


def test_a_link_delay_under_the_redis_timeout_excuses_nothing() -> None:
    slow = fault("link-delay", "B", 19, 2, delay_s=0.1)
    report = check(data(ledger=[call(10, [5], 101), call(20, [5], 102)], faults=[slow]))
    assert promises(report.broken) == ["one fetch per id"]


def test_a_saved_history_checks_the_same_again(tmp_path: Path) -> None:
    eviction = Eviction(7, "A", T0 + 10, T0 + 10.1, 200)
    run = data(
        faults=[fault("link-cut", "B", 9, 3, pids=(102,))],
        answers=[answer(1, "B", [7, 97], 13)],
        evictions=[eviction],
        leases_idle={"fl:{5}:lease": ("101-ab.3", 1500)},
        dead={102: T0 + 50},
    )
    ledger = [call(1, [7], 101), call(20, [5], 101), call(21, [5], 102)]
    history.save(run, tmp_path)
    (tmp_path / history.LEDGER).write_text("".join(orjson.dumps(c).decode() + "\n" for c in ledger))
    run.ledger = ledger
    again = history.load(tmp_path)
    assert again == run
    assert render(check(again)) == render(check(run))
