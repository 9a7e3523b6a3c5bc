"""`python -m tests.chaos [--seed N] [--seconds S]`: one chaos run; exit 1 when a promise broke.

The seed is printed first: the same seed gives the same schedule of faults. The run's
ledger, history, logs and report stay in its work folder; `--check WORK` checks a run
again from them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

from tests.chaos import history
from tests.chaos.checker import check
from tests.chaos.run import run_chaos
from tests.chaos.schedule import KINDS, Kind
from tests.chaos.table import render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--seed", type=int, default=_env_int("CHAOS_SEED"))
    parser.add_argument("--seconds", type=float, default=_env_int("CHAOS_SECONDS") or 180)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--job-every", type=float, default=60.0, help="seconds between crawls")
    parser.add_argument("--job-ids", type=int, default=500, help="ids per crawl job")
    parser.add_argument(
        "--faults", default=",".join(KINDS), help=f"kinds to draw from (of {', '.join(KINDS)})"
    )
    parser.add_argument("--work", type=Path, help="keep logs and the ledger here")
    parser.add_argument("--check", type=Path, metavar="WORK", help="check a saved run again")
    args = parser.parse_args(argv)
    if args.check is not None:
        report = check(history.load(args.check))
        print(render(report))
        return 1 if report.broken else 0
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    kinds: tuple[Kind, ...] = tuple(k for k in KINDS if k in args.faults.split(","))
    if not kinds:
        parser.error(f"--faults names none of {', '.join(KINDS)}")
    if shutil.which("redis-server") is None:
        print("redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix=f"chaos-{seed}-"))
    report = asyncio.run(
        run_chaos(
            seed=seed,
            seconds=args.seconds,
            work=work,
            clients=args.clients,
            job_every_s=args.job_every,
            job_ids=args.job_ids,
            kinds=kinds,
        )
    )
    print(f"seed {seed}; logs and ledger in {work}")
    return 1 if report.broken else 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


if __name__ == "__main__":
    sys.exit(main())
