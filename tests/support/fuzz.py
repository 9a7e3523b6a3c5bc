"""`make fuzz`: Schemathesis' command line against a running gateway, open and with keys.

Each run starts `python -m app` on loopback in demo mode (its built-in simulator is
Freelancer), with the client limits lifted (the fuzzer is one client sending thousands of
requests) and callbacks on (to a closed loopback port: `tests/support/fuzz_hooks.py`),
then runs `st run` with every check and every phase, the stateful one included. A run
fails on any finding the hooks do not accept, or on a traceback or an unexpected error
in the gateway's log. FUZZ_EXAMPLES (default 50) sets the examples per operation.

    python -m tests.support.fuzz [open|keys|no-callbacks ...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.procs import Process, free_port

KEY = "fuzz-admin-key-0123456789abcdef"
MODES = {
    "open": {},
    "keys": {"API_KEYS": f"fuzz:{KEY}:admin"},
    # Without WEBHOOK_SECRET the schema says a job takes no callback.
    "no-callbacks": {"WEBHOOK_SECRET": ""},
}
ST = Path(sys.executable).with_name("st")


def gateway(work: Path, **settings: str) -> Process:
    """`python -m app` on a free loopback port, in demo mode, limits lifted."""
    port = free_port()
    env = {
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "SQLITE_PATH": str(work / "users.db"),
        "SIMULATOR_LATENCY_MS": "0",
        "UPSTREAM_RATE_PER_MIN": "1000000",
        "UPSTREAM_RATE_PER_HOUR": "1000000000",
        "UPSTREAM_BURST": "1000",
        "RATE_LIMIT_PER_MIN": "1000000000",
        "RATE_LIMIT_IDS_PER_MIN": "1000000000",
        "KEY_MISSES_PER_MIN": "1000000000",
        "EVENTS_MAX_STREAMS_PER_KEY": "100",
        "JOB_MAX_RANGE": "1000",  # the jobs it submits are crawled for real
        "WEBHOOK_SECRET": "fuzz-webhook-secret",
        "WEBHOOK_ALLOW_PRIVATE": "true",
        "WAIT_TIMEOUT_S": "2",
        "LOG_LEVEL": "WARNING",
        **settings,
    }
    return Process([sys.executable, "-m", "app"], port, work / "gateway.log", env=env, cwd=work)


def run(mode: str, examples: int) -> bool:
    """One gateway, one `st run`; True when both came out clean."""
    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{mode}-"))
    server = gateway(work, **MODES[mode])
    server.start()
    args = [
        str(ST),
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(examples),
        "--seed",
        os.environ.get("FUZZ_SEED", "18"),
        "--request-timeout",
        "10",
        "--workers",
        "1",
        "--no-color",
    ]
    if mode == "keys":
        args += ["-H", f"X-API-Key: {KEY}"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.support.fuzz_hooks"}
    root = Path(__file__).resolve().parents[2]
    try:
        result = subprocess.run(args, env=env, cwd=root, capture_output=True, text=True)
    finally:
        server.stop()
    report = work / "st.log"
    report.write_text(result.stdout + result.stderr)
    log = server.output()
    problems = [
        line for line in log.splitlines() if "Traceback" in line or "unexpected error" in line
    ]
    print(f"--- {mode}: st run exited {result.returncode} (full output: {report})")
    print("\n".join(result.stdout.splitlines()[-25:]))
    if problems:
        print(f"--- {mode}: the gateway logged errors (log: {server.log}):")
        print("\n".join(problems[:20]))
    return result.returncode == 0 and not problems


def main(argv: list[str]) -> int:
    modes = argv or list(MODES)
    examples = int(os.environ.get("FUZZ_EXAMPLES", "50"))
    results = {mode: run(mode, examples) for mode in modes}
    print(
        "--- summary:", ", ".join(f"{m}: {'ok' if ok else 'FAILED'}" for m, ok in results.items())
    )
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
