"""The clients of a run: lookups of overlapping ids against random servers, evictions with
probes of every server after them, and crawl jobs with callbacks. Every request is
recorded (what was asked of whom, when it was answered and with what) for the checker.

Ids come in waves: every WAVE_S a wave of WAVE_IDS new ids begins, and about half the
requests ask for the whole current wave, so the same new ids reach every server at about
the same moment (the cross-process single flight is exercised all the time) while the
upstream calls needed (one a wave, when every process agrees) stay near the budget. Every
request also asks a few ids of earlier waves (mostly cached). Job ids come from a range of
their own, so a crawl's users are never asked by the clients: any of them in a process's
memory came from the crawl.
"""

from __future__ import annotations

import asyncio
import random
import time
from calendar import timegm
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.chaos.cluster import WAIT_TIMEOUT_S, Cluster
from tests.chaos.schedule import SERVERS

BASE_ID = 10_000_000
WAVE_S = 2.5
WAVE_IDS = 6
JOB_BASE = 50_000_000
CLIENT_SLACK_S = 12.0
"""A client gives up on an answer this long after the gateway's deadline (a paused
process answers only once resumed)."""
EVICT_PROBE_AFTER_S = 1.5
"""Each server is asked for an evicted id this long after the eviction was answered."""


@dataclass
class Answer:
    """One request as the client saw it."""

    n: int
    kind: str
    """lookup, probe (after an eviction), evict, job."""
    server: str
    ids: list[int]
    start: float
    end: float = 0.0
    status: int | None = None
    error: str | None = None
    """A transport failure: the server did not answer (refused, reset, timed out)."""
    users: dict[int, tuple[str, float, str]] = field(default_factory=dict)
    """id -> (source, fetched_at (whole seconds), username)."""
    not_found: list[int] = field(default_factory=list)
    unavailable: dict[int, str] = field(default_factory=dict)
    body_problem: str | None = None


@dataclass
class Eviction:
    uid: int
    server: str
    start: float
    end: float
    status: int | None


@dataclass
class JobSubmission:
    job_id: str
    server: str
    at: float
    ids: int


@dataclass
class Load:
    """Drives the clients until `stop` is set; keeps everything they saw."""

    cluster: Cluster
    seed: int
    clients: int = 6
    answers: list[Answer] = field(default_factory=list)
    evictions: list[Eviction] = field(default_factory=list)
    jobs: list[JobSubmission] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = 0.0
    _n: int = 0

    def wave(self, now: float) -> int:
        """The first id of the wave current at `now`."""
        return BASE_ID + int((now - self.started) / WAVE_S) * WAVE_IDS

    async def run(self, *, job_every_s: float, job_ids: int) -> None:
        self.started = time.time()
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        timeout = httpx.Timeout(WAIT_TIMEOUT_S + CLIENT_SLACK_S, connect=3)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
            tasks = [
                asyncio.create_task(self._lookups(http, random.Random(self.seed * 100 + c)))
                for c in range(self.clients)
            ]
            tasks.append(asyncio.create_task(self._evictions(http, random.Random(self.seed))))
            tasks.append(
                asyncio.create_task(
                    self._jobs(http, random.Random(self.seed + 1), job_every_s, job_ids)
                )
            )
            await asyncio.gather(*tasks)

    # ---- clients ----------------------------------------------------------------------

    async def _lookups(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        while not self.stop.is_set():
            wave = self.wave(time.time())
            ids = set(range(wave, wave + WAVE_IDS)) if rng.random() < 0.5 else set()
            if wave > BASE_ID:
                ids |= {rng.randrange(BASE_ID, wave) for _ in range(rng.randint(1, 6))}
            if not ids:
                ids = set(range(wave, wave + WAVE_IDS))
            await self.lookup(http, rng.choice(SERVERS), sorted(ids), "lookup")
            await asyncio.sleep(rng.uniform(0.05, 0.4))

    async def lookup(
        self, http: httpx.AsyncClient, server: str, ids: list[int], kind: str
    ) -> Answer:
        self._n += 1
        answer = Answer(self._n, kind, server, ids, time.time())
        self.answers.append(answer)
        url = f"{self.cluster.servers[server].url}/api/users"
        try:
            response = await http.post(url, json={"user_ids": ids})
        except httpx.HTTPError as exc:
            answer.end = time.time()
            answer.error = type(exc).__name__
            return answer
        answer.end = time.time()
        answer.status = response.status_code
        if response.status_code == 200:
            _read_body(answer, response)
        return answer

    async def _evictions(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        """Every few seconds evict a user the clients have seen, then ask every server."""
        while not self.stop.is_set():
            await _sleep_unless(self.stop, rng.uniform(4.0, 7.0))
            seen = [
                uid
                for a in self.answers[-200:]
                if a.kind == "lookup"
                for uid, (source, _, _) in a.users.items()
                if source in ("cache", "fetched", "shared")
            ]
            if not seen or self.stop.is_set():
                continue
            uid = rng.choice(seen)
            server = rng.choice(SERVERS)
            start = time.time()
            url = f"{self.cluster.servers[server].url}/api/cache/users/{uid}"
            status: int | None = None
            try:
                status = (await http.delete(url)).status_code
            except httpx.HTTPError:
                status = None
            self.evictions.append(Eviction(uid, server, start, time.time(), status))
            await asyncio.sleep(EVICT_PROBE_AFTER_S)
            probes = [self.lookup(http, name, [uid], "probe") for name in SERVERS]
            probes.append(self.lookup(http, "W", [uid], "probe"))  # W's other worker, likely
            await asyncio.gather(*probes)

    async def _jobs(
        self, http: httpx.AsyncClient, rng: random.Random, every_s: float, size: int
    ) -> None:
        """A crawl job (with a callback) now and then, on a random server."""
        await _sleep_unless(self.stop, 2.0)
        while not self.stop.is_set():
            first = JOB_BASE + len(self.jobs) * size
            server = rng.choice(SERVERS)
            body: dict[str, Any] = {
                "id_range": [first, first + size - 1],
                "callback_url": self.cluster.receiver.url,
                "label": f"chaos-{len(self.jobs)}",
            }
            url = f"{self.cluster.servers[server].url}/api/jobs"
            for _ in range(5):  # the server may be paused or restarting: try another
                try:
                    response = await http.post(url, json=body)
                except httpx.HTTPError:
                    server = rng.choice(SERVERS)
                    url = f"{self.cluster.servers[server].url}/api/jobs"
                    continue
                if response.status_code == 202:
                    job_id = response.json()["job_id"]
                    self.jobs.append(JobSubmission(job_id, server, time.time(), size))
                break
            await _sleep_unless(self.stop, every_s)


def _read_body(answer: Answer, response: httpx.Response) -> None:
    try:
        body = response.json()
        for user in body["users"]:
            fetched = timegm(time.strptime(user["fetched_at"], "%Y-%m-%dT%H:%M:%SZ"))
            answer.users[int(user["user_id"])] = (user["source"], fetched, user["username"])
        answer.not_found = [int(u) for u in body["not_found"]]
        errors = body.get("errors") or {}
        answer.unavailable = {int(u): str(errors.get(str(u), "?")) for u in body["unavailable"]}
    except (ValueError, KeyError, TypeError) as exc:
        answer.body_problem = f"unreadable body: {type(exc).__name__}: {exc}"


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        pass
