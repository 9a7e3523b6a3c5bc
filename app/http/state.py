"""What the lifespan runs and the routes read: one typed object on `app.state.services`."""

from __future__ import annotations

from dataclasses import dataclass

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

    def detach(self) -> None:
        """The lifespan is ending: routes answer 503 from now on."""
        self.gateway = self.runner = self.dashboard = None


def services_of(app: Starlette) -> Services:
    """The app's `Services` (set by `create_app`)."""
    services: Services = app.state.services
    return services
