"""A clock for tests: seconds that move only when the test steps them."""

from __future__ import annotations


class FakeClock:
    """Callable like `time.time` or `time.monotonic`; `advance` steps it."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`."""
        self.now += seconds
