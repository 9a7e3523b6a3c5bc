"""`python -m app.simulator --port 9000 [--ledger calls.ndjson]`: the Freelancer simulator as
its own process; with `--ledger`, every upstream call it receives is appended to that file."""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn

from app.simulator.app import FAULTS, SimulatorConfig, create_simulator_app
from app.simulator.ledger import Ledger


def main(argv: list[str] | None = None) -> None:
    """Parse the flags and serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m app.simulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--not-found-modulus", type=int, default=97)
    parser.add_argument("--fault", choices=FAULTS)
    parser.add_argument("--fault-rate", type=float, default=1.0)
    parser.add_argument("--rate-limit-per-min", type=int)
    parser.add_argument("--require-token")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--ledger",
        type=Path,
        help="append every upstream call received to this file, one JSON object a line",
    )
    args = parser.parse_args(argv)
    config = SimulatorConfig(
        latency_ms=args.latency_ms,
        not_found_modulus=args.not_found_modulus,
        fault=args.fault,
        fault_rate=args.fault_rate,
        rate_limit_per_min=args.rate_limit_per_min,
        require_token=args.require_token,
    )
    ledger = Ledger(args.ledger) if args.ledger is not None else None
    try:
        uvicorn.run(
            create_simulator_app(config, ledger=ledger),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=False,
        )
    finally:
        if ledger is not None:
            ledger.close()


if __name__ == "__main__":
    main()
