"""The store-path workload of `make bench`: cached users that are in the store but not in
memory (the long tail), against the same users served from memory, in the same run.

Random 50-id batches over STORE_USERS users, all cached (ids that do not exist are left
out, so every id is a store hit). The memory side is the bench's main gateway, which holds
them in its 100 000-user LRU; the store side is a second gateway on the same SQLite file
whose LRU is capped at its minimum (MEMORY_CACHE_SIZE=1000, 5 % of the users), so nearly
every batch reads its ids from the store. Same wrk method as the hot workload: alternating
runs, each side's median run, and the ratio of the medians. Beside them, the store floor
(bench/baseline.py): each batch read by one query and joined, with none of the gateway's
duties, for what a store hit can cost at least.
"""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench.baseline import baseline_process
from bench.measure import (
    BYTES_PER_USER_TARGET,
    HOT_BATCH,
    HOT_CONNECTIONS,
    HOT_ROUNDS,
    HOT_RUN_S,
    median_run,
    metric,
    post_users,
    run_wrk,
)
from tests.support.procs import Process, gateway_process, sim_stats

STORE_USERS = 20_000
STORE_MEMORY_CACHE = 1000
"""The store side's LRU: the smallest MEMORY_CACHE_SIZE allowed."""
STORE_TARGET_RATIO = 0.40
STORE_MOONSHOT_RATIO = 0.60


def store_ids(max_id: int) -> list[int]:
    """STORE_USERS cached ids the main gateway holds in memory (the 90 % most recently
    cached of 1..max_id), none divisible by 97 (those do not exist)."""
    rng = random.Random(19)
    held = [uid for uid in range(max_id // 10 + 1, max_id + 1) if uid % 97]
    return sorted(rng.sample(held, min(STORE_USERS, len(held))))


def store_script(path: Path, ids: list[int]) -> None:
    """A wrk Lua script that POSTs random HOT_BATCH-id batches of `ids`, 1 000 bodies."""
    rng = random.Random(23)
    bodies = [json.dumps({"user_ids": rng.sample(ids, HOT_BATCH)}) for _ in range(1000)]
    lua = [
        "wrk.method = 'POST'",
        "wrk.headers['Content-Type'] = 'application/json'",
        "local bodies = {" + ",".join(f"[[{b}]]" for b in bodies) + "}",
        "local i = 0",
        "request = function() i = i % #bodies + 1 return wrk.format(nil, nil, nil, bodies[i]) end",
    ]
    path.write_text("\n".join(lua) + "\n")


def cpu_s(pid: int) -> float:
    """CPU seconds a process has used, all its threads, user and system (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_wrk(server: Process, script: Path) -> dict[str, Any]:
    """`run_wrk`, and the CPU the server spent per request (less sensitive than requests a
    second to what else runs on the machine)."""
    before = cpu_s(server.pid)
    run = run_wrk(f"{server.url}/api/users", script, HOT_RUN_S)
    requests = run["rps"] * HOT_RUN_S
    run["cpu_us_per_request"] = (cpu_s(server.pid) - before) * 1e6 / requests
    return run


def store_path(memory: Process, sim: Process, max_id: int, work: Path) -> dict[str, Any]:
    """Store hits against memory hits, same ids, same load, alternating runs."""
    ids = store_ids(max_id)
    script = work / "store.lua"
    store_script(script, ids)
    store = gateway_process(work, sim, MEMORY_CACHE_SIZE=str(STORE_MEMORY_CACHE))
    floor = baseline_process(work, users=work / "data" / "users.db", from_store=True)
    store.start()
    floor.start("/")
    try:
        servers = {"memory": memory, "store": store, "store floor": floor}
        with httpx.Client() as client:
            answers = [
                post_users(client, server.url, ids[:HOT_BATCH])[1] for server in servers.values()
            ]
        if not answers[0] == answers[1] == answers[2]:
            raise RuntimeError("the store path and the store floor must answer as memory does")
        for server in servers.values():  # warm the connections and the code
            run_wrk(f"{server.url}/api/users", script, 2)
        before = sim_stats(sim)["calls"]
        misses = metric(store, "gateway_cache_misses_total")
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        for _ in range(HOT_ROUNDS):
            for name, server in servers.items():
                runs[name].append(timed_wrk(server, script))
        upstream_calls = sim_stats(sim)["calls"] - before
        misses = metric(store, "gateway_cache_misses_total") - misses
    finally:
        store.stop()
        floor.stop()
    from_memory, from_store = median_run(runs["memory"]), median_run(runs["store"])
    from_floor = median_run(runs["store floor"])
    ratio = from_store["rps"] / from_memory["rps"]
    cpu = {
        name: sorted(r["cpu_us_per_request"] for r in rs)[len(rs) // 2] for name, rs in runs.items()
    }
    errors = [r for rs in runs.values() for r in rs if r["non_2xx"] or r["socket_errors"]]
    from_store.update(
        users=len(ids),
        upstream_calls=upstream_calls,
        misses=misses,
        memory=from_memory,
        vs_memory=ratio,
        runs_rps=[round(r["rps"]) for r in runs["store"]],
        memory_runs_rps=[round(r["rps"]) for r in runs["memory"]],
        floor_runs_rps=[round(r["rps"]) for r in runs["store floor"]],
        floor_vs_memory=from_floor["rps"] / from_memory["rps"],
        vs_floor=from_store["rps"] / from_floor["rps"],
        floor_cpu_us_per_request=cpu["store floor"],
        connections=HOT_CONNECTIONS,
        cpu_us_per_request=cpu["store"],
        memory_cpu_us_per_request=cpu["memory"],
        cpu_ratio=cpu["memory"] / cpu["store"],
    )
    from_store["checks"] = {
        f">= {STORE_TARGET_RATIO:.0%} of the memory path": ratio >= STORE_TARGET_RATIO,
        "no errors": not errors,
        "no upstream calls, no misses": upstream_calls == 0 and misses == 0,
    }
    return from_store


def memory_kb(pid: int) -> dict[str, int]:
    """A process's resident memory by kind, from /proc: VmRSS, RssAnon, RssFile (kB)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0])
    return fields


def memory_from_store(sim: Process, max_id: int, work: Path) -> dict[str, Any]:
    """Memory per cached user: a fresh gateway on the store of the warm-up's users loads
    them all (100-id lookups from 8 threads, as the warm-up), and its memory above its start
    is divided by the users it holds. Nothing is fetched or saved: what is measured is what
    holding them costs, not the heap a burst of unthrottled fetches and saves leaves behind
    (the warm-up's figure; Freelancer's budget, 50 calls a minute, never allows one).

    Anonymous memory (RssAnon): the store's reads map the SQLite file, and the pages of it
    they touch count in RSS as file pages, which are the kernel's page cache, not the
    process's own (the warm-up's figure, which maps almost none, is VmRSS)."""
    gateway = gateway_process(work, sim)
    gateway.start()
    ids = [uid for uid in range(1, max_id + 1) if uid % 97]  # the ones that exist
    try:
        start = memory_kb(gateway.pid)
        chunks = [ids[i : i + 100] for i in range(0, len(ids), 100)]
        with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda chunk: post_users(client, gateway.url, chunk), chunks))
        end = memory_kb(gateway.pid)
        held = metric(gateway, "gateway_memory_cache_users")
        misses = metric(gateway, "gateway_cache_misses_total")
    finally:
        gateway.stop()
    per_user = (end["RssAnon"] - start["RssAnon"]) * 1024 / held
    found = sum(len(body["users"]) for _, body in answers)
    return {
        "memory_users": int(held),
        "start_anon_mb": start["RssAnon"] / 1024,
        "anon_mb": end["RssAnon"] / 1024,
        "file_mb": (end["RssFile"] - start["RssFile"]) / 1024,
        "rss_mb": end["VmRSS"] / 1024,
        "bytes_per_user": per_user,
        "checks": {
            f"<= {BYTES_PER_USER_TARGET} B per user above start": per_user <= BYTES_PER_USER_TARGET,
            "all from the store": misses == 0 and found == len(ids),
        },
    }


def summary(result: dict[str, Any]) -> str:
    """One line for the bench's printout."""
    memory = result["memory"]
    return (
        f"store path / memory path: {result['vs_memory']:.0%} (target "
        f"{STORE_TARGET_RATIO:.0%}, moonshot {STORE_MOONSHOT_RATIO:.0%}; medians of "
        f"{HOT_ROUNDS} alternating {HOT_RUN_S} s runs over {result['users']} users: "
        f"{result['runs_rps']} vs {result['memory_runs_rps']}; "
        f"p50/p99 {result['p50_ms']:.1f}/{result['p99_ms']:.1f} ms vs "
        f"{memory['p50_ms']:.1f}/{memory['p99_ms']:.1f} ms); CPU per request "
        f"{result['cpu_us_per_request']:.0f} vs {result['memory_cpu_us_per_request']:.0f} us "
        f"({result['cpu_ratio']:.0%}); the store floor (one query, parse, join; nothing "
        f"else) / memory path: {result['floor_vs_memory']:.0%} ({result['floor_runs_rps']}, "
        f"CPU {result['floor_cpu_us_per_request']:.0f} us), the store path / the store floor: "
        f"{result['vs_floor']:.0%}"
    )


def memory_summary(workloads: dict[str, Any], users: int) -> str:
    """The memory figures: bytes per cached user above the process's start, held from the
    store (the target) and after the warm-up's fetches."""
    held = workloads[f"memory ({users} users from the store)"]
    warmed = workloads[f"memory ({users} users)"]
    return (
        f"memory: {held['bytes_per_user']:.0f} B per cached user above start, "
        f"{held['memory_users']} users loaded from the store (anonymous memory "
        f"{held['start_anon_mb']:.0f} -> {held['anon_mb']:.0f} MB, and {held['file_mb']:.0f} MB "
        f"of the file mapped; target <= {BYTES_PER_USER_TARGET} B); after the "
        f"warm-up's fetches {warmed['bytes_per_user']:.0f} B ({warmed['start_rss_mb']:.0f} -> "
        f"{warmed['rss_mb']:.0f} MB: {warmed['rss_anon_mb']:.0f} MB anonymous, "
        f"{warmed['rss_file_mb']:.0f} MB of files mapped), "
        f"{warmed['bytes_per_user_second_half']:.0f} B a user over its second half"
    )
