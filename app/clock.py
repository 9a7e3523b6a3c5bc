"""Time as a dependency: the wall clock that freshness is measured on, injectable in tests."""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]
"""Seconds since the Unix epoch, as `time.time` gives them."""

wall_clock: Clock = time.time
