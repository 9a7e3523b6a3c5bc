"""`python -m bench.soak`: minutes of mixed traffic against one gateway process.

Hits, misses (fresh ids, evicted ids, ids that do not exist), single-user reads, bad
input and stats reads, while the simulator's faults are toggled every few seconds. It
checks: no 500 ever, no 5xx from the batch endpoint, every request answered, RSS within
10 % of its level after the first minute, open file descriptors flat. Writes
bench/soak.json; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.measure import HERE, machine, rss_mb
from tests.support.procs import gateway_process, sim_configure, simulator_process

CLIENTS = 8
HOT = range(1, 5001)
FAULTS: list[dict[str, Any]] = [
    {"fault": None},
    {"fault": "error", "fault_rate": 0.3},
    {"fault": None},
    {"fault": "hang", "fault_rate": 0.2, "hang_s": 3},
    {"fault": None},
    {"fault": "rate_limit", "fault_rate": 0.5, "retry_after_s": 1},
    {"fault": "malformed", "fault_rate": 0.3},
]
JSON = {"Content-Type": "application/json"}
"""Bad bodies declared JSON, so that they reach the parser (a JSON route refuses others)."""
BAD_BODIES = [b"not json", b'{"user_ids": []}', b'{"user_ids": [0, true]}', b"[1,2]", b"{" * 200]


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


class Traffic:
    """Closed-loop clients, each with its own connection pool, until `stop` is set."""

    def __init__(self, url: str, seed: int) -> None:
        self.url = url
        self.stop = threading.Event()
        self.statuses: Counter[str] = Counter()
        self.failures: list[str] = []
        self.requests = 0
        self.lock = threading.Lock()
        self.next_miss = 1_000_000
        self.seed = seed

    def record(self, kind: str, status: int) -> None:
        with self.lock:
            self.requests += 1
            self.statuses[f"{kind} {status}"] += 1
            if status == 500 or (kind == "batch" and status >= 500 and status != 503):
                self.failures.append(f"{kind} answered {status}")

    def fresh_ids(self, count: int) -> list[int]:
        with self.lock:
            start = self.next_miss
            self.next_miss += count
        return list(range(start, start + count))

    def client(self, index: int) -> None:
        rng = random.Random(self.seed + index)
        with httpx.Client(base_url=self.url, timeout=20) as http:
            while not self.stop.is_set():
                roll = rng.random()
                try:
                    if roll < 0.55:
                        body = {"user_ids": rng.sample(HOT, 50)}
                        self.record("batch", http.post("/api/users", json=body).status_code)
                    elif roll < 0.70:
                        ids = [*self.fresh_ids(5), 97 * rng.randint(1, 10_000)]
                        self.record(
                            "batch", http.post("/api/users", json={"user_ids": ids}).status_code
                        )
                    elif roll < 0.75:
                        uid = rng.choice(HOT)
                        self.record("evict", http.delete(f"/api/users/{uid}").status_code)
                    elif roll < 0.85:
                        uid = rng.choice(HOT)
                        self.record("single", http.get(f"/api/users/{uid}").status_code)
                    elif roll < 0.95:
                        bad = rng.choice(BAD_BODIES)
                        answer = http.post("/api/users", content=bad, headers=JSON)
                        self.record("bad", answer.status_code)
                    else:
                        self.record("stats", http.get("/api/stats").status_code)
                except httpx.HTTPError as exc:
                    with self.lock:
                        self.failures.append(f"unanswered: {type(exc).__name__}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--seconds", type=int, default=300)
    args = parser.parse_args()
    baseline_at = min(60, args.seconds // 3)
    with tempfile.TemporaryDirectory(prefix="gateway-soak-") as tmp:
        work = Path(tmp)
        sim = simulator_process(work, latency_ms=30)
        gateway = gateway_process(
            work,
            sim,
            UPSTREAM_TIMEOUT_S="1",
            WAIT_TIMEOUT_S="3",
            BREAKER_COOLDOWN_S="2",
            # Misses bring ever new ids: a small memory cache reaches its bound within the
            # first minute, so RSS after that measures leaks, not the cache filling.
            MEMORY_CACHE_SIZE="20000",
        )
        sim.start("/_sim/stats")
        gateway.start()
        traffic = Traffic(gateway.url, seed=5)
        samples: list[dict[str, float]] = []
        try:
            with httpx.Client(base_url=gateway.url, timeout=60) as http:
                for start in range(1, HOT.stop, 100):  # warm the hot set
                    http.post("/api/users", json={"user_ids": list(range(start, start + 100))})
            threads = [threading.Thread(target=traffic.client, args=(i,)) for i in range(CLIENTS)]
            for thread in threads:
                thread.start()
            started = time.monotonic()
            fault_index = 0
            while (elapsed := time.monotonic() - started) < args.seconds:
                if int(elapsed) // 15 != fault_index:
                    fault_index = int(elapsed) // 15
                    sim_configure(sim, **{"fault": None, **FAULTS[fault_index % len(FAULTS)]})
                samples.append(
                    {"t": elapsed, "rss_mb": rss_mb(gateway.pid), "fds": open_fds(gateway.pid)}
                )
                time.sleep(5)
            traffic.stop.set()
            for thread in threads:
                thread.join(30)
            duration = time.monotonic() - started
        finally:
            traffic.stop.set()
            gateway.stop()
            sim.stop()
    base = next(s for s in samples if s["t"] >= baseline_at)
    end = samples[-1]
    checks = {
        "no 500, no 5xx from POST /api/users, every request answered": not traffic.failures,
        f"RSS at end within 10% of RSS at {baseline_at} s": end["rss_mb"] <= base["rss_mb"] * 1.1,
        "open fds flat (+5 at most)": end["fds"] <= base["fds"] + 5,
    }
    result = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(duration),
        "requests": traffic.requests,
        "rps": traffic.requests / duration,
        "statuses": dict(traffic.statuses),
        "failures": Counter(traffic.failures),
        "rss_mb": {
            "baseline": base["rss_mb"],
            "end": end["rss_mb"],
            "max": max(s["rss_mb"] for s in samples),
        },
        "fds": {"baseline": base["fds"], "end": end["fds"]},
        "checks": checks,
    }
    (HERE / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"machine: {result['machine']}")
    print(
        f"{traffic.requests} requests in {duration:.0f} s ({result['rps']:.0f}/s), faults toggled"
    )
    print("statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(traffic.statuses.items())))
    print(
        f"RSS MB: {base['rss_mb']:.0f} at {baseline_at} s -> {end['rss_mb']:.0f} at end; "
        f"fds {base['fds']} -> {end['fds']}"
    )
    for name, ok in checks.items():
        print(f"{'ok    ' if ok else 'FAILED'} {name}")
    if traffic.failures:
        print("failures:", dict(Counter(traffic.failures)))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
