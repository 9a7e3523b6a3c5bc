"""The checker: reads the ledger, the clients' answers and what the processes said, and
holds each cross-process promise. Each exception is a named fault, stated here once:

- **Budget**: at most PER_MIN calls in any 60 s and PER_HOUR in any 3 600 s, counted at
  the simulator by receipt time. Allowed: a process cut off from Redis (link cut,
  silenced, or slower than REDIS_TIMEOUT_S) spends its share of each window meanwhile, so
  up to ceil(limit / processes) more for each such fault the window overlaps.
- **One fetch per id** (the ledger). Allowed: an eviction of the id between the two
  calls; owner death (the first caller killed within KILLED_AFTER_FETCH_S of its call,
  maybe before its save); and, for a second call made during the fault or within
  SETTLE_S of its end: a paused process (either caller paused: its lease lapses, or its
  Redis calls time out when it wakes), a process cut off from Redis (either caller's link
  cut, silenced, or slower than REDIS_TIMEOUT_S), Redis restarted or frozen.
- **Every request answered by WAIT_TIMEOUT_S + SLACK_S**, never a 5xx but a 503.
  Allowed: the server asked was paused or killed while the request was open.
- **Every answer right**: each id asked once in the answer, the simulator's own user,
  not-found exactly for the ids it lacks. No exception.
- **An eviction reaches every process** within EVICT_BOUND_S of its answer. Allowed: a
  fault on the evicting or the answering server, or on Redis, meanwhile: then within
  EVICT_SETTLE_S of the fault's end; the evicting process killed: no bound.
- **No lease outlives its owner's fetch**: none held by a live process once everything
  is idle; a killed owner's lease lapses within FLIGHT_LEASE_S.
- **A crawl does not grow other processes' memory**: a server's memory never holds more
  users than its clients were answered. No exception.
- **A callback once per deployment**, signed, with one Idempotency-Key. Allowed: a fault
  during the delivery, then at least once, every copy with the same key.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from app.simulator.users import synthetic_user
from tests.chaos.cluster import (
    LEASE_S,
    PER_HOUR,
    PER_MIN,
    PROCESSES,
    REDIS_TIMEOUT_S,
    WAIT_TIMEOUT_S,
    FaultRecord,
)
from tests.chaos.load import Answer, Eviction, JobSubmission
from tests.chaos.receiver import Delivery

SLACK_S = 2.0
"""An answer may come this long after WAIT_TIMEOUT_S (a loaded 2-core machine)."""
PRE_S = 1.0
SETTLE_S = 5.0
"""After a fault ends, how long its effects may last: a down mark (2 s after a failed
Redis call), a silent link noticed (max(2 s, 4 x REDIS_TIMEOUT_S)) and replaced."""
KILLED_AFTER_FETCH_S = 5.0
"""From an owner's call to its store save: a call, the announcement, one upsert."""
EVICT_BOUND_S = 1.0
EVICT_SETTLE_S = 6.0
NOT_FOUND_MODULUS = 97
WINDOWS = ((60.0, PER_MIN), (3600.0, PER_HOUR))
SHARE = {60.0: math.ceil(PER_MIN / PROCESSES), 3600.0: math.ceil(PER_HOUR / PROCESSES)}
DUP_KINDS = ("pause", "kill", "redis-restart", "redis-freeze", "link-cut", "link-silence")


@dataclass
class RunData:
    """Everything a run leaves for the checker."""

    seed: int
    chaos_start: float
    chaos_end: float
    faults: list[FaultRecord]
    ledger: list[dict[str, Any]]
    answers: list[Answer]
    evictions: list[Eviction]
    jobs: list[JobSubmission]
    job_views: dict[str, dict[str, Any]]
    deliveries: list[Delivery]
    memory: dict[str, list[int]]
    """Per server, memory_cache_size as its processes answered /api/stats at the end."""
    leases_idle: dict[str, tuple[str, int]]
    leases_later: dict[str, tuple[str, int]]
    pids: dict[int, str]
    dead: dict[int, float]
    coordinated: str | None
    """Why the deployment did not come back together after the faults (None: it did)."""


@dataclass
class Broken:
    promise: str
    detail: str


@dataclass
class Row:
    name: str
    start: float
    end: float
    fault: FaultRecord | None = None
    requests: int = 0
    in_time: int = 0
    excused: int = 0
    """Late or unanswered, while the server asked was paused or killed."""
    status_503: int = 0
    dups_allowed: bool = False
    dups_explained: int = 0
    dups_unexplained: int = 0
    budget_peak: int = 0
    evictions: int = 0
    evictions_seen: int = 0


@dataclass
class Report:
    data: RunData
    rows: list[Row]
    broken: list[Broken] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    duplicates: list[tuple[int, str]] = field(default_factory=list)
    """Every id fetched twice, with the reason allowed (or "UNEXPLAINED")."""


def check(data: RunData) -> Report:
    rows = _rows(data)
    report = Report(data, rows)
    _budget(data, report)
    _duplicates(data, report)
    _answers(data, report)
    _evictions(data, report)
    _leases(data, report)
    _memory(data, report)
    _callbacks(data, report)
    if data.coordinated is not None:
        report.broken.append(Broken("coordination resumes by itself", data.coordinated))
    return report


# ---- time and faults --------------------------------------------------------------------


def _rows(data: RunData) -> list[Row]:
    """One row per fault, from its start to the next one's, and one before the first."""
    starts = [f.start for f in data.faults]
    bounds = [data.chaos_start, *starts, math.inf]
    rows = [Row("(before faults)", bounds[0], bounds[1])]
    for i, record in enumerate(data.faults):
        rows.append(Row(record.fault.describe(), bounds[i + 1], bounds[i + 2], record))
        rows[-1].dups_allowed = _allows_duplicates(record)
    return rows


def _row(rows: list[Row], at: float) -> Row:
    for row in reversed(rows):
        if at >= row.start:
            return row
    return rows[0]


def _allows_duplicates(record: FaultRecord) -> bool:
    fault = record.fault
    if fault.kind == "link-delay":
        return 2 * fault.delay_s >= REDIS_TIMEOUT_S * 0.8
    return fault.kind in DUP_KINDS


def _cuts_off(record: FaultRecord) -> bool:
    """Whether the fault leaves one server's processes without Redis (and the rest with)."""
    fault = record.fault
    if fault.kind == "link-delay":
        return _allows_duplicates(record)
    return fault.kind in ("link-cut", "link-silence")


def _overlaps(record: FaultRecord, start: float, end: float, *, settle: float) -> bool:
    return record.start - PRE_S <= end and start <= record.end + settle


def _server_of(data: RunData, pid: int | None) -> str | None:
    return data.pids.get(pid) if pid is not None else None


# ---- the promises -----------------------------------------------------------------------


def _calls(data: RunData) -> list[dict[str, Any]]:
    return sorted((c for c in data.ledger if c.get("ids")), key=lambda c: c["t"])


def _budget(data: RunData, report: Report) -> None:
    calls = _calls(data)
    times = [c["t"] for c in calls]
    for period, limit in WINDOWS:
        peak, over = 0, None
        for i, at in enumerate(times):
            # Calls in (at - period, at]: how Freelancer counts a window ending at `at`.
            used = bisect_right(times, at) - bisect_right(times, at - period)
            peak = max(peak, used)
            if period == 60.0:
                row = _row(report.rows, at)
                row.budget_peak = max(row.budget_peak, used)
            if used <= limit or over is not None:
                continue
            cut = [
                f
                for f in data.faults
                if _cuts_off(f) and _overlaps(f, at - period, at, settle=SETTLE_S)
            ]
            allowed = limit + SHARE[period] * len(cut)
            if used > allowed:
                why = f" ({len(cut)} processes cut off from Redis allow {allowed})" if cut else ""
                over = Broken(
                    "budget window",
                    f"{used} calls in the {period:.0f} s ending at "
                    f"{at - data.chaos_start:+.1f}s (limit {limit}){why}: "
                    f"pid {calls[i].get('pid')}",
                )
                report.broken.append(over)  # the first of each window size says enough
        report.figures[f"budget_peak_{period:.0f}s"] = peak
    report.figures["upstream_calls"] = len(calls)


def _duplicates(data: RunData, report: Report) -> None:
    by_id: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for call in _calls(data):
        if call.get("status") in (200, 404):
            for uid in call["ids"]:
                by_id[uid].append(call)
    evicted: dict[int, list[Eviction]] = defaultdict(list)
    for eviction in data.evictions:
        evicted[eviction.uid].append(eviction)
    found = 0
    for uid, calls in by_id.items():
        for first, second in itertools.pairwise(calls):
            found += 1
            reason = _why_twice(data, uid, first, second, evicted[uid])
            row = _row(report.rows, second["t"])
            if reason is None:
                row.dups_unexplained += 1
                report.duplicates.append((uid, "UNEXPLAINED"))
                report.broken.append(
                    Broken(
                        "one fetch per id",
                        f"id {uid} fetched by pid {first.get('pid')} "
                        f"({_server_of(data, first.get('pid'))}) at "
                        f"{first['t'] - data.chaos_start:+.2f}s and again by pid "
                        f"{second.get('pid')} ({_server_of(data, second.get('pid'))}) at "
                        f"{second['t'] - data.chaos_start:+.2f}s with no fault to allow it",
                    )
                )
            else:
                row.dups_explained += reason != "evicted"
                report.duplicates.append((uid, reason))
    report.figures["ids_fetched"] = len(by_id)
    report.figures["refetches"] = found


def _why_twice(
    data: RunData,
    uid: int,
    first: dict[str, Any],
    second: dict[str, Any],
    evictions: Iterable[Eviction],
) -> str | None:
    """The named fault (or eviction) that allows a second fetch of `uid`, or None.

    The second call must come during the fault or within SETTLE_S of its end, by a
    process the fault touched (or any, when Redis itself failed). Owner death is the one
    exception: the first caller killed within KILLED_AFTER_FETCH_S of its call may have
    died before its answer reached the store, so any later lookup fetches again."""
    t1, t2 = first["t"], second["t"]
    if any(e.start < t2 and e.end > t1 - 0.5 for e in evictions):
        return "evicted"
    pids = {first.get("pid"), second.get("pid")}
    servers = {_server_of(data, pid) for pid in pids}
    for record in data.faults:
        kind = record.fault.kind
        if (
            kind == "kill"
            and first.get("pid") in record.pids
            and t1 - PRE_S <= record.start <= t1 + KILLED_AFTER_FETCH_S
            and record.start <= t2
        ):
            return "owner death (kill)"
        if not _allows_duplicates(record) or not _overlaps(record, t2, t2, settle=SETTLE_S):
            continue
        if kind == "pause" and pids & set(record.pids):
            return "paused process (lease lapsed or its Redis calls timed out)"
        if kind.startswith("link-") and record.fault.target in servers:
            return f"cut off from Redis ({kind} {record.fault.target})"
        if kind in ("redis-restart", "redis-freeze"):
            return f"Redis gone ({kind})"
    return None


def _answers(data: RunData, report: Report) -> None:
    limit = WAIT_TIMEOUT_S + SLACK_S
    latencies = []
    for answer in data.answers:
        if answer.kind not in ("lookup", "probe"):
            continue
        row = _row(report.rows, answer.start)
        row.requests += 1
        took = answer.end - answer.start
        if answer.error is None and answer.status is not None:
            latencies.append(took)
        on_time = answer.error is None and took <= limit
        if on_time and answer.status is not None and answer.status < 500:
            row.in_time += 1
        elif _process_stopped(data, answer):
            row.excused += 1
        elif answer.status == 503 and on_time:
            row.in_time += 1
            row.status_503 += 1
        else:
            what = answer.error or f"HTTP {answer.status}"
            report.broken.append(
                Broken(
                    "answered by the deadline, no 5xx but 503",
                    f"request {answer.n} to {answer.server} at "
                    f"{answer.start - data.chaos_start:+.2f}s: {what} after {took:.2f} s",
                )
            )
        if answer.status == 200:
            problem = answer.body_problem or _wrong(answer)
            if problem:
                report.broken.append(Broken("every answer right", f"request {answer.n}: {problem}"))
        elif answer.status is not None and answer.status < 500:
            report.broken.append(
                Broken("every answer right", f"request {answer.n}: HTTP {answer.status}")
            )
    latencies.sort()
    if latencies:
        report.figures["latency_p50_s"] = round(latencies[len(latencies) // 2], 3)
        report.figures["latency_p99_s"] = round(latencies[int(len(latencies) * 0.99)], 3)
        report.figures["latency_max_s"] = round(latencies[-1], 3)
    report.figures["requests"] = sum(r.requests for r in report.rows)
    report.figures["unavailable_ids"] = sum(len(a.unavailable) for a in data.answers)


def _process_stopped(data: RunData, answer: Answer) -> bool:
    """Whether a process of the server asked was paused or killed while it was asked."""
    end = answer.end or answer.start
    for record in data.faults:
        if record.fault.kind not in ("pause", "kill") or record.fault.target != answer.server:
            continue
        if record.start <= end and answer.start <= record.end + 1.0:
            return True
    return False


def _wrong(answer: Answer) -> str | None:
    """What is wrong with a 200 answer, by the simulator's own users."""
    seen = [*answer.users, *answer.not_found, *answer.unavailable]
    if sorted(seen) != sorted(answer.ids):
        return f"ids asked {answer.ids}, answered {sorted(seen)}"
    for uid, (_, _, username) in answer.users.items():
        user = synthetic_user(uid, NOT_FOUND_MODULUS)
        if user is None or user["username"] != username:
            return (
                f"id {uid} answered as {username!r}, Freelancer says {user and user['username']!r}"
            )
    for uid in answer.not_found:
        if synthetic_user(uid, NOT_FOUND_MODULUS) is not None:
            return f"id {uid} answered not found, but Freelancer has it"
    return None


def _evictions(data: RunData, report: Report) -> None:
    calls = _calls(data)
    answered_at: dict[int, list[float]] = defaultdict(list)
    for call in calls:
        for uid in call["ids"]:
            answered_at[uid].append(call["done"])
    for times in answered_at.values():
        times.sort()
    for eviction in data.evictions:
        if eviction.status != 200:
            continue
        row = _row(report.rows, eviction.start)
        row.evictions += 1
        late = _old_copies_after(data, eviction, answered_at[eviction.uid])
        if not late:
            row.evictions_seen += 1
        for answer, bound in late:
            report.broken.append(
                Broken(
                    "an eviction reaches every process",
                    f"id {eviction.uid} evicted on {eviction.server} at "
                    f"{eviction.start - data.chaos_start:+.2f}s, still served from before it "
                    f"by {answer.server} at {answer.start - data.chaos_start:+.2f}s "
                    f"({answer.start - eviction.end:.1f} s after; bound {bound:.1f} s)",
                )
            )


def _old_copies_after(
    data: RunData, eviction: Eviction, refetched: list[float]
) -> list[tuple[Answer, float]]:
    """Answers that served the copy from before `eviction` after its bound."""
    uid = eviction.uid
    found = []
    for answer in data.answers:
        if uid not in answer.users or answer.start <= eviction.end:
            continue
        _, fetched_at, _ = answer.users[uid]
        # Pre-eviction: no call for it answered between the eviction and this answer,
        # or its copy (fetched_at, whole seconds) is a second older than the eviction.
        i = bisect_left(refetched, eviction.start)
        newer = i < len(refetched) and refetched[i] <= answer.end
        if newer and fetched_at + 1 > eviction.start:
            continue
        bound = _eviction_bound(data, eviction, answer)
        if bound is not None and answer.start > eviction.end + bound:
            found.append((answer, bound))
    return found


def _eviction_bound(data: RunData, eviction: Eviction, answer: Answer) -> float | None:
    """How long after its answer the eviction may still be unseen by `answer`'s server
    (None: no bound, the evicting process was killed before it could tell anyone)."""
    bound = EVICT_BOUND_S
    for record in data.faults:
        if not _overlaps(record, eviction.start, answer.start, settle=EVICT_SETTLE_S):
            continue
        target = record.fault.target
        if target is None or target in (eviction.server, answer.server):
            if record.fault.kind == "kill" and target == eviction.server:
                return None
            bound = max(bound, record.end + EVICT_SETTLE_S - eviction.end)
    return bound


def _leases(data: RunData, report: Report) -> None:
    report.figures["leases_when_idle"] = len(data.leases_idle)
    for key, (token, ttl) in data.leases_idle.items():
        pid = int(token.split("-", 1)[0]) if token.split("-", 1)[0].isdigit() else None
        if pid is not None and pid not in data.dead:
            report.broken.append(
                Broken(
                    "no lease outlives its owner's fetch",
                    f"{key} held by live, idle pid {pid} ({_server_of(data, pid)}), {ttl} ms left",
                )
            )
        elif ttl > LEASE_S * 1000 or ttl < 0:
            report.broken.append(
                Broken("no lease outlives its owner's fetch", f"{key}: {ttl} ms left (no expiry?)")
            )
    for key, (token, _) in data.leases_later.items():
        report.broken.append(
            Broken(
                "no lease outlives its owner's fetch",
                f"{key} ({token}) still there {LEASE_S + 1:.0f} s after the deployment went idle",
            )
        )


def _memory(data: RunData, report: Report) -> None:
    asked: dict[str, set[int]] = defaultdict(set)
    for answer in data.answers:
        asked[answer.server].update(answer.users)
    for server, sizes in data.memory.items():
        report.figures[f"memory_{server}"] = max(sizes, default=0)
        report.figures[f"answered_users_{server}"] = len(asked[server])
        for size in sizes:
            if size > len(asked[server]):
                report.broken.append(
                    Broken(
                        "a crawl does not grow other processes' memory",
                        f"{server} holds {size} users in memory; its clients were answered "
                        f"{len(asked[server])} distinct users",
                    )
                )
                break


def _callbacks(data: RunData, report: Report) -> None:
    by_job: dict[str, list[Delivery]] = defaultdict(list)
    for delivery in data.deliveries:
        by_job[delivery.job_id].append(delivery)
    report.figures["jobs"] = len(data.jobs)
    report.figures["callbacks"] = len(data.deliveries)
    for job in data.jobs:
        view = data.job_views.get(job.job_id, {})
        got = by_job.get(job.job_id, [])
        if view.get("status") != "completed" or view.get("done") != job.ids:
            report.broken.append(
                Broken(
                    "a crawl finishes",
                    f"job {job.job_id}: {view.get('status')}, {view.get('done')} of {job.ids} done",
                )
            )
        if not got:
            report.broken.append(Broken("callback delivered", f"job {job.job_id}: none received"))
            continue
        keys = {d.idempotency_key for d in got}
        if len(keys) != 1 or not all(d.signed for d in got):
            report.broken.append(
                Broken(
                    "callback delivered",
                    f"job {job.job_id}: keys {sorted(keys)}, signed {[d.signed for d in got]}",
                )
            )
        if len(got) > 1:
            start, end = got[0].at - 30.0, got[-1].at
            if not any(_overlaps(f, start, end, settle=SETTLE_S) for f in data.faults):
                report.broken.append(
                    Broken(
                        "a callback once per deployment",
                        f"job {job.job_id}: {len(got)} deliveries with no fault to allow it",
                    )
                )
