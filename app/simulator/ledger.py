"""The simulator's ledger: every upstream call it received, one JSON object a line (NDJSON).

The chaos harness (`python -m tests.chaos`) judges the gateway by what Freelancer would
have seen, so the ledger is kept where the calls land, not in the gateways: a process
that is paused, killed or cut off cannot forget to write it. Each line says when the call
was received (`t`, Unix seconds of this host's clock, the time base the harness records
its faults in), when it was answered (`done`), which ids it asked for, the status
answered, and which gateway process sent it: the gateway's `User-Agent` carries its
process id (`freelancer-user-gateway/0.1 (pid 1234)`), read back here as `pid`.

Written with one `write` per line on a file opened for appending, flushed at once: a
reader sees whole lines only, and the lines a killed simulator wrote stay readable.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any, TextIO

import orjson

PID = re.compile(r"\(pid (\d+)\)")


def caller_pid(user_agent: str | None) -> int | None:
    """The process id a gateway's User-Agent names, or None."""
    match = PID.search(user_agent or "")
    return int(match.group(1)) if match else None


class Ledger:
    """Appends one line per upstream call to `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO | None = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self.lines = 0

    def record(
        self,
        *,
        received: float,
        answered: float,
        ids: list[int],
        kind: str,
        status: int,
        user_agent: str | None,
    ) -> None:
        """One call: when it came and went, what it asked, what it was answered, by whom."""
        entry: dict[str, Any] = {
            "t": round(received, 6),
            "done": round(answered, 6),
            "kind": kind,
            "ids": ids,
            "status": status,
            "pid": caller_pid(user_agent),
            "ua": (user_agent or "")[:200],
        }
        line = orjson.dumps(entry).decode() + "\n"
        with self._lock:
            if self._file is None:
                return
            self._file.write(line)
            self._file.flush()
            self.lines += 1

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """Every whole line of a ledger, in the order written (a torn last line is skipped)."""
    entries: list[dict[str, Any]] = []
    if not path.exists():
        return entries
    for line in path.read_bytes().splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries
