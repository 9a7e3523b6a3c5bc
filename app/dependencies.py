"""Dependencies the routers declare, as `Annotated` aliases over the lifespan's state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.errors import ShuttingDown
from app.gateway import Gateway


def get_gateway(request: Request) -> Gateway:
    """The running gateway; 503 outside the lifespan."""
    gateway: Gateway | None = getattr(request.app.state, "gateway", None)
    if gateway is None:
        raise ShuttingDown("the gateway is not running")
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
