"""A short chaos run (`make chaos` is the long one): the deployment under a fixed seed's
faults keeps every cross-process promise, as the checker reads the simulator's ledger."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.chaos.run import run_chaos

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

SEED = 7
"""Its schedule (`make_schedule(7, 32)`): B's link cut, A killed and restarted, Redis
frozen, B paused, every subscription killed. `make chaos` draws from every kind."""
SECONDS = 32.0


@pytest.mark.timeout(170)
async def test_a_short_chaos_run_keeps_every_promise(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (make test installs it when run as root)")
    lines: list[str] = []
    report = await run_chaos(
        seed=SEED,
        seconds=SECONDS,
        work=tmp_path / "chaos",
        clients=4,
        job_ids=200,
        say=lines.append,
    )
    table = "\n".join(lines)
    print(table)  # shown with -s, and in the failure below
    assert len(report.data.faults) >= 4, table
    assert report.figures["upstream_calls"] >= 5, table
    assert report.figures["requests"] >= 100, table
    assert report.data.deliveries, table
    assert not report.broken, table
