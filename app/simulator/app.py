"""A stand-in for Freelancer's users API, in Freelancer's format, with injectable faults."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import orjson
from fastapi import FastAPI, Request, Response

from app.simulator.ledger import Ledger
from app.simulator.users import synthetic_user

Fault = Literal[
    "error", "hang", "rate_limit", "malformed", "wrong_shape", "unauthorized", "forbidden"
]
FAULTS = ("error", "hang", "rate_limit", "malformed", "wrong_shape", "unauthorized", "forbidden")
CALL_TIMES = 10_000
"""Call times kept for `max_calls_in_*` (the budget checks of the benchmark)."""


@dataclass
class SimulatorConfig:
    """How the simulator behaves; changeable at run time through `POST /_sim/config`."""

    latency_ms: float = 0.0
    not_found_modulus: int = 97
    fault: Fault | None = None
    fault_rate: float = 1.0
    hang_s: float = 60.0
    retry_after_s: int = 1
    rate_limit_per_min: int | None = None
    require_token: str | None = None
    seed: int = 0


@dataclass
class SimulatorStats:
    """What the simulator was asked. `per_id` grows with distinct ids (test and bench scale);
    `call_times` keeps the monotonic times of the last CALL_TIMES calls."""

    calls: int = 0
    batch_calls: int = 0
    single_calls: int = 0
    ids_requested: int = 0
    max_ids_per_call: int = 0
    faults_served: int = 0
    per_id: Counter[int] = field(default_factory=Counter)
    call_times: deque[float] = field(default_factory=lambda: deque(maxlen=CALL_TIMES))

    def public(self) -> dict[str, int]:
        """The counters `GET /_sim/stats` answers with."""
        unique = len(self.per_id)
        return {
            "calls": self.calls,
            "batch_calls": self.batch_calls,
            "single_calls": self.single_calls,
            "ids_requested": self.ids_requested,
            "unique_ids": unique,
            "duplicate_lookups": self.ids_requested - unique,
            "max_ids_per_call": self.max_ids_per_call,
            "faults_served": self.faults_served,
            "max_calls_in_60s": most_calls_within(self.call_times, 60.0),
            "max_calls_in_3600s": most_calls_within(self.call_times, 3600.0),
        }


def most_calls_within(times: Iterable[float], period_s: float) -> int:
    """The most of `times` (ascending) in any window [t, t + period_s)."""
    ordered = list(times)
    best = start = 0
    for end, at in enumerate(ordered):
        while at - ordered[start] >= period_s:
            start += 1
        best = max(best, end - start + 1)
    return best


class SimulatorState:
    """The simulator's config, stats, fault dice and rate-limit window."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.stats = SimulatorStats()
        self.random = random.Random(config.seed)
        self.window_start = time.monotonic()
        self.window_calls = 0

    def reset(self) -> None:
        """Zero the stats, the fault dice and the rate-limit window."""
        self.stats = SimulatorStats()
        self.random = random.Random(self.config.seed)
        self.window_start = time.monotonic()
        self.window_calls = 0

    def configure(self, changes: dict[str, Any]) -> None:
        """Apply changes to the config; ValueError names what is wrong."""
        known = {f.name for f in fields(SimulatorConfig)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
        if "fault" in changes and changes["fault"] not in (None, *FAULTS):
            raise ValueError(f"fault must be one of {', '.join(FAULTS)} or null")
        for name in ("latency_ms", "fault_rate", "hang_s"):
            value = changes.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{name} must be a number >= 0")
        if not 0 <= float(changes.get("fault_rate", 0)) <= 1:
            raise ValueError("fault_rate must be between 0 and 1")
        for name, value in changes.items():
            setattr(self.config, name, value)
        if "seed" in changes:
            self.random = random.Random(self.config.seed)

    def rate_limit_headers(self) -> tuple[dict[str, str], int | None]:
        """Count this call in the 60 s window: headers to send, and Retry-After if over."""
        limit = self.config.rate_limit_per_min
        if limit is None:
            return {}, None
        now = time.monotonic()
        if now - self.window_start >= 60:
            self.window_start, self.window_calls = now, 0
        self.window_calls += 1
        headers = {
            "RateLimit-Limit": f"{limit};window=60",
            "RateLimit-Remaining": str(max(0, limit - self.window_calls)),
        }
        if self.window_calls > limit:
            return headers, max(1, int(60 - (now - self.window_start)) + 1)
        return headers, None


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> Response:
    body = {"status": "error", "message": message, "error_code": code, "request_id": _rid()}
    return _json(body, status, headers)


def _rid() -> str:
    return uuid.uuid4().hex


def create_simulator_app(
    config: SimulatorConfig | None = None, *, ledger: Ledger | None = None
) -> FastAPI:
    """A fresh simulator whose state lives in `app.state.sim`; every upstream call it
    receives is written to `ledger` when one is given."""
    app = FastAPI(title="Freelancer users API simulator", docs_url=None, redoc_url=None)
    sim = SimulatorState(config or SimulatorConfig())
    app.state.sim = sim
    app.state.ledger = ledger

    async def answer(request: Request, ids: list[int], single: bool) -> Response:
        received = time.time()
        response = await respond(request, ids, single)
        if ledger is not None:
            ledger.record(
                received=received,
                answered=time.time(),
                ids=ids,
                kind="single" if single else "batch",
                status=response.status_code,
                user_agent=request.headers.get("user-agent"),
            )
        return response

    async def respond(request: Request, ids: list[int], single: bool) -> Response:
        config, stats = sim.config, sim.stats
        stats.calls += 1
        stats.call_times.append(time.monotonic())
        if single:
            stats.single_calls += 1
        else:
            stats.batch_calls += 1
        stats.ids_requested += len(ids)
        stats.max_ids_per_call = max(stats.max_ids_per_call, len(ids))
        stats.per_id.update(ids)
        if config.latency_ms:
            await asyncio.sleep(config.latency_ms / 1000)
        if (
            config.require_token
            and request.headers.get("Freelancer-OAuth-V1") != config.require_token
        ):
            return _error(
                401,
                "You must be logged in to perform this request",
                "RestExceptionCodes.NOT_AUTHENTICATED",
            )
        headers, retry_after = sim.rate_limit_headers()
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
            return _error(
                429, "Rate limit exceeded", "AuthorisationExceptionCodes.RATE_LIMITED", headers
            )
        if config.fault and sim.random.random() < config.fault_rate:
            stats.faults_served += 1
            fault = await _fault(config)
            if fault is not None:
                return fault
        modulus = config.not_found_modulus
        if single:
            user = synthetic_user(ids[0], modulus)
            if user is None:
                return _error(404, "User not found", "RestExceptionCodes.NOT_FOUND", headers)
            return _json({"status": "success", "result": user, "request_id": _rid()}, 200, headers)
        users = {}
        for uid in ids:
            user = synthetic_user(uid, modulus)
            if user is not None:
                users[str(uid)] = user
        body = {"status": "success", "result": {"users": users}, "request_id": _rid()}
        return _json(body, 200, headers)

    @app.get("/api/users/0.1/users")
    @app.get("/api/users/0.1/users/")
    async def batch(request: Request) -> Response:
        """Freelancer's batch look-up: `?users[]=1&users[]=2`."""
        raw = request.query_params.getlist("users[]")
        try:
            ids = list(dict.fromkeys(int(v) for v in raw))
        except ValueError:
            refused = _error(
                400, "users[] must be integers", "RestExceptionCodes.INVALID_PARAMETER"
            )
            if ledger is not None:
                now = time.time()
                agent = request.headers.get("user-agent")
                ledger.record(
                    received=now, answered=now, ids=[], kind="batch", status=400, user_agent=agent
                )
            return refused
        return await answer(request, ids, single=False)

    @app.get("/api/users/0.1/users/{user_id}")
    @app.get("/api/users/0.1/users/{user_id}/")
    async def single(request: Request, user_id: str) -> Response:
        """Freelancer's single look-up."""
        if not user_id.isdigit():
            return _error(404, "User not found", "RestExceptionCodes.NOT_FOUND")
        return await answer(request, [int(user_id)], single=True)

    @app.get("/_sim/stats")
    async def stats() -> Response:
        """What the simulator was asked since start or the last reset."""
        return _json(sim.stats.public())

    @app.post("/_sim/reset")
    async def reset() -> Response:
        """Zero the stats and the rate-limit window."""
        sim.reset()
        return _json(sim.stats.public())

    @app.get("/_sim/config")
    async def get_config() -> Response:
        """The current config."""
        return _json(asdict(sim.config))

    @app.post("/_sim/config")
    async def set_config(request: Request) -> Response:
        """Change any config fields: `{"fault": "error", "fault_rate": 0.5}`."""
        try:
            changes = orjson.loads(await request.body())
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object of config fields")
            sim.configure(changes)
        except (orjson.JSONDecodeError, ValueError) as exc:
            return _json({"detail": str(exc)}, 422)
        return _json(asdict(sim.config))

    return app


async def _fault(config: SimulatorConfig) -> Response | None:
    """The faulty answer for the configured fault; None for `hang` (it answers late)."""
    fault = config.fault
    if fault == "error":
        return _error(500, "Internal server error", "RestExceptionCodes.INTERNAL_ERROR")
    if fault == "hang":
        await asyncio.sleep(config.hang_s)
        return None
    if fault == "rate_limit":
        return _error(
            429,
            "Rate limit exceeded",
            "AuthorisationExceptionCodes.RATE_LIMITED",
            {"Retry-After": str(config.retry_after_s)},
        )
    if fault == "malformed":
        return Response(
            b'{"status": "success", "result": {"users": {', 200, media_type="application/json"
        )
    if fault == "wrong_shape":
        return _json({"status": "success", "result": [], "request_id": _rid()})
    if fault == "unauthorized":
        return _error(
            401,
            "You must be logged in to perform this request",
            "RestExceptionCodes.NOT_AUTHENTICATED",
        )
    return _error(
        403, "You are not allowed to perform this action", "AuthorisationExceptionCodes.FORBIDDEN"
    )
