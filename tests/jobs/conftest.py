"""Fixtures of the jobs tests: a callback receiver on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.receiver import Receiver, serve_receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A callback receiver on a free loopback port (WEBHOOK_ALLOW_PRIVATE=true reaches it)."""
    with serve_receiver() as state:
        yield state
