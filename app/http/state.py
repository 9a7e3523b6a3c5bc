"""What the lifespan runs and the routes read: one typed object on `app.state.services`."""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from app.config import Settings
from app.dashboard.hub import DashboardHub
from app.gateway import Gateway
from app.http.auth import KeyRing
from app.http.client_limits import ClientLimits
from app.jobs.runner import JobRunner


@dataclass(slots=True, eq=False)
class Services:
    """The app's parts: built with the app (settings, keys, limits, metrics) or set by the
    lifespan while it runs (gateway, job runner, dashboard hub; None outside it)."""

    settings: Settings
    keys: KeyRing
    limits: ClientLimits
    registry: CollectorRegistry
    gateway: Gateway | None = None
    runner: JobRunner | None = None
    dashboard: DashboardHub | None = None
    streams: EventStreams = field(default_factory=lambda: EventStreams())

    def detach(self) -> None:
        """The lifespan is ending: routes answer 503 from now on."""
        self.gateway = self.runner = self.dashboard = None


class EventStreams:
    """The `/api/events` streams each client holds open, to bound them per client.

    A stream is its generator, held weakly: it counts until it has finished, or until
    nothing refers to it any more (a response that never started), so no way a stream
    ends can leave its place taken.
    """

    def __init__(self) -> None:
        self._by_client: defaultdict[str, weakref.WeakSet[AsyncGenerator[Any, None]]] = defaultdict(
            weakref.WeakSet
        )

    def open(self, client: str) -> int:
        """How many streams `client` holds that have not finished."""
        streams = self._by_client.get(client)
        if streams is None:
            return 0
        count = sum(1 for stream in streams if getattr(stream, "ag_frame", None) is not None)
        if not count:
            del self._by_client[client]
        return count

    def add(self, client: str, stream: AsyncGenerator[Any, None]) -> None:
        self._by_client[client].add(stream)


def services_of(app: Starlette) -> Services:
    """The app's `Services` (set by `create_app`)."""
    services: Services = app.state.services
    return services
