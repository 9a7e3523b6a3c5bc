"""The fault schedule: a seeded, replayable list of faults, one at a time with quiet gaps.

The same seed and length give the same schedule (kinds, targets, start offsets,
durations), printed before a run, so a run that found something can be replayed. The
faults run one at a time, each followed by a quiet gap, so what the checker finds in a
stretch of time is put down to one fault (or to none). Kinds are drawn round by round from
a shuffled list of them all, so even a short run meets several kinds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, get_args

Kind = Literal[
    "pause",
    "kill",
    "redis-restart",
    "redis-freeze",
    "pubsub-kill",
    "link-cut",
    "link-delay",
    "link-silence",
]
KINDS: tuple[Kind, ...] = get_args(Kind)
PROCESS_KINDS = ("pause", "kill")
LINK_KINDS = ("link-cut", "link-delay", "link-silence")
REDIS_KINDS = ("redis-restart", "redis-freeze", "pubsub-kill")

SERVERS = ("A", "B", "W")
"""The gateway servers: A and B are one process each, W is `python -m app` with WORKERS=2
(its faults of kind pause and kill hit one of its two uvicorn workers)."""

WORKER_PAUSE_MAX_S = 3.0
"""uvicorn's supervisor kills a worker that does not answer its ping for 5 s: a longer
pause of a worker would become a kill."""


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault: what, on which server (None: Redis itself), from `at_s` for `for_s`."""

    kind: Kind
    target: str | None
    at_s: float
    """Seconds after the chaos phase began."""
    for_s: float
    delay_s: float = 0.0
    """For link-delay: how long each chunk is held, both ways."""

    def describe(self) -> str:
        where = f" {self.target}" if self.target else ""
        extra = f" ({self.delay_s * 1000:.0f} ms each way)" if self.kind == "link-delay" else ""
        return f"{self.kind}{where}{extra} at {self.at_s:.1f}s for {self.for_s:.1f}s"


def make_schedule(
    seed: int,
    seconds: float,
    *,
    kinds: tuple[Kind, ...] = KINDS,
    start_s: float = 3.0,
    gap_s: tuple[float, float] = (3.0, 5.0),
) -> list[Fault]:
    """Faults for a chaos phase of `seconds`, from `seed`: each ends `gap_s` before the
    next begins, and the last ends by `seconds` (with a gap to spare)."""
    rng = random.Random(seed)
    faults: list[Fault] = []
    at = start_s
    pool: list[Kind] = []
    while True:
        if not pool:
            pool = list(kinds)
            rng.shuffle(pool)
        kind = pool.pop()
        fault = _fault(rng, kind, at)
        if fault.at_s + fault.for_s + gap_s[0] > seconds:
            return faults
        faults.append(fault)
        at = fault.at_s + fault.for_s + rng.uniform(*gap_s)


def _fault(rng: random.Random, kind: Kind, at: float) -> Fault:
    if kind in PROCESS_KINDS:
        target = rng.choice(SERVERS)
        if kind == "pause":
            longest = WORKER_PAUSE_MAX_S if target == "W" else 6.0
            return Fault(kind, target, at, round(rng.uniform(1.0, longest), 1))
        return Fault(kind, target, at, round(rng.uniform(0.5, 2.0), 1))  # then restarted
    if kind == "redis-restart":
        return Fault(kind, None, at, round(rng.uniform(0.5, 3.0), 1))
    if kind == "redis-freeze":
        return Fault(kind, None, at, round(rng.uniform(1.0, 4.0), 1))
    if kind == "pubsub-kill":
        return Fault(kind, None, at, 0.0)
    target = rng.choice(SERVERS)
    if kind == "link-delay":
        # A round trip (twice the delay) below REDIS_TIMEOUT_S (survived as is), or above.
        delay = rng.choice((0.1, 0.4))
        return Fault(kind, target, at, round(rng.uniform(2.0, 6.0), 1), delay_s=delay)
    return Fault(kind, target, at, round(rng.uniform(2.0, 6.0), 1))
