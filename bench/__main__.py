"""`make bench`: the gateway and the simulator as separate processes on loopback.

Workloads, in order: cold overlap, one miss, warm-up to 100 000 users and memory, hot
cached batches under wrk, and the same wrk load against a trivial FastAPI handler for
scale; then the crawl jobs (bench/jobs.py), each on its own gateway. Prints one table,
writes bench/results.json, exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench import jobs, middleware
from bench.baseline import baseline_process
from bench.measure import (
    HERE,
    HOT_BATCH,
    HOT_ROUNDS,
    HOT_RUN_S,
    machine,
    median_run,
    metric,
    percentile,
    post_users,
    rss_mb,
    run_wrk,
    table,
    verdict,
    wait_saved,
)
from bench.store_path import memory_from_store, memory_kb, memory_summary, store_path
from bench.store_path import summary as store_summary_line
from tests.support.procs import (
    Process,
    RedisServer,
    gateway_process,
    sim_configure,
    sim_stats,
    simulator_process,
)

SIM_LATENCY_MS = 100.0
HOT_TARGET_RATIO = 0.70
BARE_TARGET_RATIO = 0.50
"""Hot rps as a share of a bare ASGI callable answering the same bytes (70 %: the moonshot)."""
BENCH_KEY = "bench-key-0123456789abcdef"
DASHBOARDS = 10
MEMORY_USERS = 100_000
JOB_SOAK_S = 300.0
"""How long the range job's memory is watched (`--job-seconds`)."""


def cold_overlap(gateway: Process, sim: Process, first_id: int = 10_000_001) -> dict[str, Any]:
    """20 concurrent clients x 50 ids drawn from 500 unique ids, all uncached."""
    rng = random.Random(7)
    universe = list(range(first_id, first_id + 500))
    batches = [rng.sample(universe, 50) for _ in range(20)]
    unique = len({i for b in batches for i in b})
    before = sim_stats(sim)
    with httpx.Client() as client, ThreadPoolExecutor(20) as pool:
        started = time.perf_counter()
        results = list(pool.map(lambda ids: post_users(client, gateway.url, ids), batches))
        wall = time.perf_counter() - started
    after = sim_stats(sim)
    latencies = [r[0] for r in results]
    unavailable = sum(len(r[1]["unavailable"]) for r in results)
    calls = after["calls"] - before["calls"]
    lookups = after["ids_requested"] - before["ids_requested"]
    return {
        "upstream_calls": calls,
        "upstream_lookups": lookups,
        "unique_ids": unique,
        "unavailable": unavailable,
        "wall_s": wall,
        "requests": len(batches),
        "rps": len(batches) / wall,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "checks": {
            "lookups == unique ids": lookups == unique,
            "upstream calls <= 10": calls <= 10,
            "wall <= 1.0 s": wall <= 1.0,
            "nothing unavailable": unavailable == 0,
        },
    }


def one_miss(gateway: Process, sim: Process) -> dict[str, Any]:
    """A single uncached id at a time, 20 times."""
    latencies = []
    with httpx.Client() as client:
        for uid in range(20_000_001, 20_000_021):
            elapsed, body = post_users(client, gateway.url, [uid])
            assert body["users"], body
            latencies.append(elapsed)
    p50 = statistics.median(latencies) * 1000
    return {
        "upstream_calls": 20,
        "requests": 20,
        "p50_ms": p50,
        "p99_ms": max(latencies) * 1000,
        "checks": {f"p50 <= {SIM_LATENCY_MS:.0f} + 30 ms": p50 <= SIM_LATENCY_MS + 30},
    }


def warm(gateway: Process, sim: Process, count: int, start_rss_mb: float) -> dict[str, Any]:
    """Cache `count` users (ids 1..count) with the simulator answering at once; the RSS,
    and the bytes per user held in memory above the RSS the process started with."""
    sim_configure(sim, latency_ms=0)
    before = sim_stats(sim)
    chunks = [list(range(i, min(i + 100, count + 1))) for i in range(1, count + 1, 100)]
    halves = chunks[: len(chunks) // 2], chunks[len(chunks) // 2 :]
    started = time.perf_counter()
    samples: list[tuple[float, float]] = []  # (RSS, users held) after each half
    results: list[tuple[float, dict[str, Any]]] = []
    with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
        for half in halves:
            results += pool.map(lambda ids: post_users(client, gateway.url, ids), half)
            samples.append((rss_mb(gateway.pid), metric(gateway, "gateway_memory_cache_users")))
    wall = time.perf_counter() - started
    kinds = memory_kb(gateway.pid)
    unavailable = sum(len(r[1]["unavailable"]) for r in results)
    after = sim_stats(sim)
    (half_rss, half_held), (rss, held) = samples
    per_user = (rss - start_rss_mb) * 1024 * 1024 / held
    return {
        "users": count,
        "memory_users": int(held),
        "start_rss_mb": start_rss_mb,
        "bytes_per_user": per_user,
        # The slope: what each user of the second half added, without the process's
        # fixed growth (buffers, the heap's high-water mark) that the first half pays.
        "bytes_per_user_second_half": (rss - half_rss) * 1024 * 1024 / (held - half_held),
        "upstream_calls": after["calls"] - before["calls"],
        "upstream_lookups": after["ids_requested"] - before["ids_requested"],
        "unique_ids": count,
        "wall_s": wall,
        "unavailable": unavailable,
        "rss_mb": rss,
        "rss_anon_mb": kinds["RssAnon"] / 1024,
        "rss_file_mb": kinds["RssFile"] / 1024,
        "checks": {"RSS <= 300 MB": rss <= 300, "nothing unavailable": unavailable == 0},
    }


def wrk_script(path: Path, max_id: int, api_key: str | None = None) -> None:
    """A wrk Lua script that POSTs 50-id batches of hot ids, 200 different bodies.

    Hot ids are drawn from the 90% most recently cached users: the ones the LRU
    (MEMORY_CACHE_SIZE, 100 000 by default) holds after the cold workloads and the warm-up.
    """
    rng = random.Random(11)
    hot_ids = range(max_id // 10 + 1, max_id + 1)
    bodies = [json.dumps({"user_ids": rng.sample(hot_ids, HOT_BATCH)}) for _ in range(200)]
    lua = ["wrk.method = 'POST'", "wrk.headers['Content-Type'] = 'application/json'"]
    if api_key:
        lua.append(f"wrk.headers['X-API-Key'] = '{api_key}'")
    lua.append("local bodies = {" + ",".join(f"[[{b}]]" for b in bodies) + "}")
    lua.append("local i = 0")
    lua.append(
        "request = function() i = i % #bodies + 1 return wrk.format(nil, nil, nil, bodies[i]) end"
    )
    path.write_text("\n".join(lua) + "\n")


def hot(gateway: Process, sim: Process, max_id: int, work: Path) -> dict[str, Any]:
    """Cached 50-id batches: open, secured, and against a fixed-body FastAPI route and a
    bare ASGI callable answering the same bytes.

    wrk with 1 thread and HOT_CONNECTIONS connections, HOT_RUN_S-second runs alternating
    between the servers, HOT_ROUNDS rounds; each side's median run is reported, and the
    ratios of the medians are the figures that count (all measured in this same run).
    "Secured" is a second gateway on the same store with an API key, request ids and
    JSON logs on (the access log stays off, as by default).
    """
    script, keyed_script = work / "hot.lua", work / "hot-keyed.lua"
    wrk_script(script, max_id)
    wrk_script(keyed_script, max_id, api_key=BENCH_KEY)
    body_file = work / "body.json"
    body_file.write_bytes(same_size_body(gateway, script))
    base = baseline_process(work, body_file)
    bare = baseline_process(work, body_file, bare=True)
    lookup_floor = baseline_process(work, users=work / "data" / "users.db")
    secured = gateway_process(work, sim, API_KEYS=f"bench:{BENCH_KEY}:read", LOG_FORMAT="json")
    base.start("/")
    bare.start("/")
    lookup_floor.start("/")
    secured.start()
    try:
        warm_from_store(secured, max_id)
        if same_size_body(lookup_floor, script) != body_file.read_bytes():
            raise RuntimeError("the lookup floor must answer as the gateway does, byte for byte")
        servers = {
            "gateway": (gateway, script),
            "secured": (secured, keyed_script),
            "fixed": (base, script),
            "bare": (bare, script),
            "lookup floor": (lookup_floor, script),
        }
        for server, lua in servers.values():  # warm the connections and the code
            run_wrk(f"{server.url}/api/users", lua, 2)
        before = sim_stats(sim)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in [*servers, "watched"]}
        for _ in range(HOT_ROUNDS):
            for name, (server, lua) in servers.items():
                runs[name].append(run_wrk(f"{server.url}/api/users", lua, HOT_RUN_S))
            with dashboards_open(gateway, DASHBOARDS):
                runs["watched"].append(run_wrk(f"{gateway.url}/api/users", script, HOT_RUN_S))
        upstream_calls = sim_stats(sim)["calls"] - before["calls"]
    finally:
        base.stop()
        bare.stop()
        lookup_floor.stop()
        secured.stop()
    result = median_run(runs["gateway"])
    fixed = median_run(runs["fixed"])
    floor = median_run(runs["bare"])
    least = median_run(runs["lookup floor"])
    keyed = median_run(runs["secured"])
    watched = median_run(runs["watched"])
    ratio = result["rps"] / fixed["rps"]
    bare_ratio = result["rps"] / floor["rps"]
    security_cost = 1 - keyed["rps"] / result["rps"]
    dashboards_cost = 1 - watched["rps"] / result["rps"]
    result.update(
        upstream_calls=upstream_calls,
        lookups_per_s=result["rps"] * HOT_BATCH,
        runs_rps=[round(r["rps"]) for r in runs["gateway"]],
        fixed_runs_rps=[round(r["rps"]) for r in runs["fixed"]],
        bare_runs_rps=[round(r["rps"]) for r in runs["bare"]],
        secured_runs_rps=[round(r["rps"]) for r in runs["secured"]],
        watched_runs_rps=[round(r["rps"]) for r in runs["watched"]],
        dashboards_cost=dashboards_cost,
        fixed_body=fixed,
        secured=keyed,
        vs_fixed_body=ratio,
        bare_asgi=floor,
        vs_bare_asgi=bare_ratio,
        lookup_floor=least,
        lookup_floor_runs_rps=[round(r["rps"]) for r in runs["lookup floor"]],
        lookup_floor_vs_bare_asgi=least["rps"] / floor["rps"],
        security_cost=security_cost,
    )
    errors = [r for rs in runs.values() for r in rs if r["non_2xx"] or r["socket_errors"]]
    result["checks"] = {
        "rps >= 3000": result["rps"] >= 3000,
        "p99 <= 15 ms": result["p99_ms"] <= 15,
        f">= {HOT_TARGET_RATIO:.0%} of fixed-body FastAPI": ratio >= HOT_TARGET_RATIO,
        f">= {BARE_TARGET_RATIO:.0%} of a bare ASGI callable": bare_ratio >= BARE_TARGET_RATIO,
        "keys, request ids, JSON logs cost <= 10 %": security_cost <= 0.10,
        f"{DASHBOARDS} dashboards open cost <= 5 %": dashboards_cost <= 0.05,
        "no errors": not errors,
        "no upstream calls": upstream_calls == 0,
    }
    return result


@contextmanager
def dashboards_open(gateway: Process, count: int) -> Iterator[None]:
    """`count` dashboards' event streams open (and read) while the block runs."""
    stop = threading.Event()
    opened = threading.Barrier(count + 1, timeout=10)

    def watch() -> None:
        with httpx.stream("GET", f"{gateway.url}/api/events", timeout=10) as response:
            opened.wait()
            for _ in response.iter_lines():
                if stop.is_set():
                    return

    threads = [threading.Thread(target=watch, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    opened.wait()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)


def warm_from_store(gateway: Process, max_id: int, key: str | None = BENCH_KEY) -> None:
    """Load the hot ids into a fresh gateway's memory from the store it shares."""
    headers = {"X-API-Key": key} if key else {}
    with httpx.Client(headers=headers, timeout=30) as client:
        for start in range(max_id // 10 + 1, max_id + 1, 100):
            ids = list(range(start, min(start + 100, max_id + 1)))
            client.post(f"{gateway.url}/api/users", json={"user_ids": ids}).raise_for_status()


def same_size_body(gateway: Process, script: Path) -> bytes:
    """The gateway's answer to the script's first batch: the fixed body the baseline serves."""
    match = re.search(r"\[\[(.*?)\]\]", script.read_text())
    assert match is not None
    response = httpx.post(
        f"{gateway.url}/api/users",
        content=match.group(1),
        headers={"content-type": "application/json"},
        timeout=10,
    )
    response.raise_for_status()
    return response.content


def scale_out(work: Path, sim: Process, max_id: int) -> dict[str, Any]:
    """Processes through a real redis-server: the cold overlap with 4 workers, Redis round
    trips per upstream batch, and cached batches served by 1 and by 2 workers."""
    redis = RedisServer(work)
    redis.start()
    results: dict[str, Any] = {}
    try:
        sim_configure(sim, latency_ms=SIM_LATENCY_MS)
        four = gateway_process(work, sim, REDIS_URL=redis.url, WORKERS="4")
        four.start()
        try:
            cold4 = cold_overlap(four, sim, first_id=40_000_001)
            # Four processes batch on their own: the targets are one look-up per id, in time.
            del cold4["checks"]["upstream calls <= 10"]
            results["cold overlap, 4 workers"] = cold4
        finally:
            four.stop()
        one = gateway_process(work, sim, REDIS_URL=redis.url)
        one.start()
        try:
            before = sim_stats(sim)["calls"]
            cold = cold_overlap(one, sim, first_id=50_000_001)
            calls = sim_stats(sim)["calls"] - before
            trips = metric(one, "gateway_coordination_round_trips_total")
            cold["redis_round_trips_per_batch"] = trips / calls
            # The claim; the announcement (done keys, leases); the publication of what the
            # fencing kept (a refused outcome is never published).
            cold["checks"]["<= 3 Redis round trips per batch"] = trips <= 3 * calls
            results["cold overlap, 1 process on Redis"] = cold
            sim_configure(sim, latency_ms=0)
            script = work / "hot.lua"
            warm_from_store(one, max_id, key=None)  # its ids that do not exist are claimed
            trips = metric(one, "gateway_coordination_round_trips_total")
            two = gateway_process(work, sim, REDIS_URL=redis.url, WORKERS="2")
            two.start()
            try:
                for _ in range(2):  # each worker fills its own memory from the store
                    run_wrk(f"{two.url}/api/users", script, 4)
                runs: dict[str, list[dict[str, Any]]] = {"1 worker": [], "2 workers": []}
                for _ in range(HOT_ROUNDS):
                    runs["1 worker"].append(run_wrk(f"{one.url}/api/users", script, HOT_RUN_S))
                    runs["2 workers"].append(run_wrk(f"{two.url}/api/users", script, HOT_RUN_S))
            finally:
                two.stop()
            hot_trips = metric(one, "gateway_coordination_round_trips_total") - trips
        finally:
            one.stop()
    finally:
        redis.stop()
    single, double = median_run(runs["1 worker"]), median_run(runs["2 workers"])
    double["checks"] = {
        "2 workers serve more than 1": double["rps"] > single["rps"] * 1.1,
        "hits never touch Redis": hot_trips == 0,
    }
    results["hot, 1 process on Redis"] = single
    results["hot, 2 workers on Redis"] = double
    return results


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--users", type=int, default=MEMORY_USERS)
    parser.add_argument(
        "--only",
        choices=["all", "store", "hot"],
        default="all",
        help="store: only the warm-up (memory per user) and the store-path workload; "
        "hot: only the warm-up and the hot workload",
    )
    parser.add_argument(
        "--job-seconds",
        type=float,
        default=JOB_SOAK_S,
        help="how long the 10 000 000-id range job runs while its RSS is sampled",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install wrk (the Makefile's bench target does this)")
        return 2
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        work = Path(tmp)
        sim = simulator_process(work, latency_ms=SIM_LATENCY_MS)
        gateway = gateway_process(work, sim)
        sim.start("/_sim/stats")
        gateway.start()
        start_rss = rss_mb(gateway.pid)
        try:
            workloads: dict[str, Any] = {}
            if args.only == "store":
                workloads[f"memory ({args.users} users)"] = warm(
                    gateway, sim, args.users, start_rss
                )
                wait_saved(gateway)
                workloads[f"memory ({args.users} users from the store)"] = memory_from_store(
                    sim, args.users, work
                )
                workloads["store path (50-id batches)"] = store_path(gateway, sim, args.users, work)
                return report_store_only(workloads, args.users)
            if args.only == "hot":
                workloads[f"memory ({args.users} users)"] = warm(
                    gateway, sim, args.users, start_rss
                )
                wait_saved(gateway)
                workloads["hot (50-id batches)"] = hot(gateway, sim, args.users, work)
                return report_hot_only(workloads)
            workloads["cold overlap"] = cold_overlap(gateway, sim)
            workloads["one miss"] = one_miss(gateway, sim)
            workloads[f"memory ({args.users} users)"] = warm(gateway, sim, args.users, start_rss)
            wait_saved(gateway)
            workloads["hot (50-id batches)"] = hot(gateway, sim, args.users, work)
            workloads[f"memory ({args.users} users from the store)"] = memory_from_store(
                sim, args.users, work
            )
            workloads["store path (50-id batches)"] = store_path(gateway, sim, args.users, work)
            if shutil.which("redis-server") is not None:
                workloads.update(scale_out(work, sim, args.users))
            else:
                print("redis-server is not installed: the multi-process workloads are skipped")
        finally:
            gateway.stop()
            sim.stop()
    hot_result = workloads["hot (50-id batches)"]
    workloads["hot, with key + request ids + JSON logs"] = hot_result.pop("secured")
    workloads["fixed-body FastAPI"] = hot_result.pop("fixed_body")
    workloads["bare ASGI callable"] = hot_result.pop("bare_asgi")
    workloads["lookup floor (bench/baseline.py)"] = hot_result.pop("lookup_floor")
    workloads.update(jobs.run(args.job_seconds))
    results = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "workloads": workloads,
        "hot_vs_fixed_body": hot_result["vs_fixed_body"],
        "hot_vs_bare_asgi": hot_result["vs_bare_asgi"],
        "security_cost": hot_result["security_cost"],
        "middleware_us": asyncio.run(middleware.measure()),
    }
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"machine: {results['machine']}")
    print(table(results))
    print(hot_summary(hot_result, workloads))
    print(
        f"hot with a key, request ids and JSON logs: {hot_result['security_cost']:.1%} slower "
        f"than open ({hot_result['secured_runs_rps']} vs {hot_result['runs_rps']}); with "
        f"{DASHBOARDS} dashboards open: {hot_result['dashboards_cost']:.1%} slower "
        f"({hot_result['watched_runs_rps']})"
    )
    costs = results["middleware_us"]
    print(
        f"middleware, added per request (in-process, bare endpoint {costs['bare_us']:.2f} us): "
        + ", ".join(f"{name} {us:.2f} us" for name, us in costs["added_us"].items())
    )
    print(store_summary_line(workloads["store path (50-id batches)"]))
    print(memory_summary(workloads, args.users))
    print("\n".join(jobs.summary(workloads)))
    return verdict(workloads)


def hot_summary(hot_result: dict[str, Any], workloads: dict[str, Any]) -> str:
    """The hot rps as a share of the fixed-body FastAPI route and of the bare callable."""
    return (
        f"hot / fixed-body FastAPI: {hot_result['vs_fixed_body']:.0%}, hot / bare ASGI "
        f"callable: {hot_result['vs_bare_asgi']:.0%} (medians of {HOT_ROUNDS} alternating "
        f"{HOT_RUN_S} s runs: {hot_result['rps']:.0f} of {hot_result['runs_rps']} vs "
        f"{workloads['fixed-body FastAPI']['rps']:.0f} of {hot_result['fixed_runs_rps']} vs "
        f"{workloads['bare ASGI callable']['rps']:.0f} of {hot_result['bare_runs_rps']}); "
        f"the lookup floor (parse, look up, join; nothing else) / bare ASGI callable: "
        f"{hot_result['lookup_floor_vs_bare_asgi']:.0%} "
        f"({hot_result['lookup_floor_runs_rps']}), the gateway / the lookup floor: "
        f"{hot_result['rps'] / workloads['lookup floor (bench/baseline.py)']['rps']:.0%}"
    )


def report_hot_only(workloads: dict[str, Any]) -> int:
    """`--only hot`: the table, the ratios and the verdict (nothing written)."""
    hot_result = workloads["hot (50-id batches)"]
    workloads["hot, with key + request ids + JSON logs"] = hot_result.pop("secured")
    workloads["fixed-body FastAPI"] = hot_result.pop("fixed_body")
    workloads["bare ASGI callable"] = hot_result.pop("bare_asgi")
    workloads["lookup floor (bench/baseline.py)"] = hot_result.pop("lookup_floor")
    print(f"machine: {machine()}")
    print(table({"workloads": workloads}))
    print(hot_summary(hot_result, workloads))
    return verdict(workloads)


def report_store_only(workloads: dict[str, Any], users: int) -> int:
    """`--only store`: the table, the two figures and the verdict (nothing written)."""
    print(f"machine: {machine()}")
    print(table({"workloads": workloads}))
    print(store_summary_line(workloads["store path (50-id batches)"]))
    print(memory_summary(workloads, users))
    return verdict(workloads)


if __name__ == "__main__":
    sys.exit(main())
