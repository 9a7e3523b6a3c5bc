"""Outcomes and events as bytes, for Redis: what one process tells the others."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson

from app.domain import UserRecord
from app.gateway.cache import cache_entry, fetched_at, record_of
from app.gateway.coordinator import Abandoned, Event, Evicted, ExpiredBefore, Fetched
from app.gateway.results import NOT_FOUND, Failure, Outcome


def outcome_to_wire(outcome: Outcome) -> Any:
    """A JSON-ready form: the record's fields, "nf", or [reason, detail]."""
    if isinstance(outcome, Failure):
        return "nf" if outcome.reason == NOT_FOUND.reason else [outcome.reason, outcome.detail]
    return {"r": list(record_of(outcome))}


def outcome_from_wire(data: Any) -> Outcome:
    """The outcome `outcome_to_wire` described; raises ValueError on anything else."""
    if data == "nf":
        return NOT_FOUND
    if isinstance(data, list) and len(data) == 2:
        return Failure(str(data[0]), str(data[1]))
    if isinstance(data, dict) and isinstance(data.get("r"), list):
        return cache_entry(UserRecord._make(data["r"]))
    raise ValueError(f"not an outcome: {data!r:.80}")


def outcome_time(outcome: Outcome, learnt_at: float) -> float:
    """When the outcome was learnt, for fencing: a user's fetched_at, else `learnt_at` (a
    not-found or a failure is as new as the answer that said it, never older than all)."""
    return learnt_at if isinstance(outcome, Failure) else fetched_at(outcome)


EVICTED = b'"ev"'
"""A `done` key's body after an eviction: no outcome to hand out, only its time."""


def done_value(at: float, body: bytes) -> bytes:
    """A `done` key's value: "<time>|<body>" (the scripts compare the time)."""
    return b"%r|%s" % (at, body)


def outcome_from_done(value: bytes) -> Outcome | None:
    """The outcome kept in a `done` key, or None for an eviction's mark."""
    body = value.split(b"|", 1)[1]
    return None if body == EVICTED else outcome_from_wire(orjson.loads(body))


def encode_event(sender: str, event: Event) -> bytes:
    """One pub/sub message."""
    body: dict[str, Any] = {"from": sender}
    if isinstance(event, Fetched):
        body["fetched"] = {str(k): outcome_to_wire(v) for k, v in event.outcomes.items()}
    elif isinstance(event, Evicted):
        body["evicted"] = list(event.user_ids)
    elif isinstance(event, ExpiredBefore):
        # JSON has no infinity ("drop your memory"); float() reads the string back.
        cutoff = event.cutoff
        body["expired_before"] = cutoff if math.isfinite(cutoff) else repr(cutoff)
    else:
        body["abandoned"] = list(event.user_ids)
    return orjson.dumps(body)


def decode_event(data: bytes) -> tuple[str, Event]:
    """The sender and the event of one message; raises ValueError when malformed."""
    try:
        body = orjson.loads(data)
        sender = str(body["from"])
        if "fetched" in body:
            outcomes = {int(k): outcome_from_wire(v) for k, v in body["fetched"].items()}
            return sender, Fetched(outcomes)
        if "evicted" in body:
            return sender, Evicted(tuple(int(i) for i in body["evicted"]))
        if "expired_before" in body:
            return sender, ExpiredBefore(float(body["expired_before"]))
        return sender, Abandoned(tuple(int(i) for i in body["abandoned"]))
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed event: {exc}") from exc


def outcomes_to_wire(outcomes: Mapping[int, Outcome]) -> dict[int, bytes]:
    """Each outcome as the bytes kept in its `done` key."""
    return {uid: orjson.dumps(outcome_to_wire(o)) for uid, o in outcomes.items()}
