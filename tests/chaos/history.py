"""A run's history on disk (`history.json` beside the ledger), so a run can be checked
again, and looked into, without being run again: `python -m tests.chaos --check WORK`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import orjson

from app.simulator.ledger import read_ledger
from tests.chaos.checker import RunData
from tests.chaos.cluster import FaultRecord
from tests.chaos.load import Answer, Eviction, JobSubmission
from tests.chaos.receiver import Delivery
from tests.chaos.schedule import Fault

HISTORY = "history.json"
LEDGER = "ledger.ndjson"


def save(data: RunData, work: Path) -> Path:
    """Everything of `data` but the ledger (which is already a file)."""
    fields = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}
    fields["ledger"] = []
    fields["faults"] = [
        {**dataclasses.asdict(r), "fault": dataclasses.asdict(r.fault)} for r in data.faults
    ]
    for name in ("answers", "evictions", "jobs", "deliveries"):
        fields[name] = [dataclasses.asdict(item) for item in fields[name]]
    path = work / HISTORY
    path.write_bytes(orjson.dumps(fields, option=orjson.OPT_NON_STR_KEYS))
    return path


def load(work: Path) -> RunData:
    """A saved run, with its ledger."""
    raw: dict[str, Any] = orjson.loads((work / HISTORY).read_bytes())
    raw["faults"] = [
        FaultRecord(**{**r, "fault": Fault(**r["fault"]), "pids": tuple(r["pids"])})
        for r in raw["faults"]
    ]
    raw["answers"] = [_answer(a) for a in raw["answers"]]
    raw["evictions"] = [Eviction(**e) for e in raw["evictions"]]
    raw["jobs"] = [JobSubmission(**j) for j in raw["jobs"]]
    raw["deliveries"] = [Delivery(**d) for d in raw["deliveries"]]
    raw["leases_idle"] = {k: tuple(v) for k, v in raw["leases_idle"].items()}
    raw["leases_later"] = {k: tuple(v) for k, v in raw["leases_later"].items()}
    raw["pids"] = {int(k): v for k, v in raw["pids"].items()}
    raw["dead"] = {int(k): v for k, v in raw["dead"].items()}
    raw["ledger"] = read_ledger(work / LEDGER)
    return RunData(**raw)


def _answer(raw: dict[str, Any]) -> Answer:
    raw["users"] = {int(k): tuple(v) for k, v in raw["users"].items()}
    raw["unavailable"] = {int(k): v for k, v in raw["unavailable"].items()}
    return Answer(**raw)
