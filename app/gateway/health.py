"""What monitoring reads off a gateway: the upstream's state and why it is degraded."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from app.gateway.gateway import Gateway

UpstreamState = Literal["ok", "throttled", "open"]

DEGRADED_AFTER_RESTART_S = 300.0


def upstream_state(gateway: Gateway) -> UpstreamState:
    """`open` while the breaker refuses calls, `throttled` while rate-limited, else `ok`."""
    if gateway.breaker.state != "closed":
        return "open"
    return "throttled" if gateway.budget.throttled else "ok"


def problems(gateway: Gateway) -> list[str]:
    """Why the gateway is degraded, each naming what to check; empty when healthy."""
    found = []
    if not gateway.writes.store_ready:
        found.append(f"store unavailable: check {gateway.store.setting}")
    if gateway.upstream.auth_failed:
        found.append(
            "Freelancer rejected the credentials: check FREELANCER_OAUTH_TOKEN / "
            "FREELANCER_CLIENT_ID"
        )
    if gateway.breaker.state != "closed":
        found.append("Freelancer is failing: circuit breaker open")
    restarted = gateway.worker.restarted_at
    if restarted is not None and gateway.clock() - restarted < DEGRADED_AFTER_RESTART_S:
        found.append("the fetch worker crashed and was restarted")
    return [*found, *gateway.coordinator.problems()]
