"""One log format for the gateway, at LOG_LEVEL."""

from __future__ import annotations

import logging


def configure_logging(level: str, *, force: bool) -> None:
    """Log to stderr at `level`; `force` replaces handlers someone else installed."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", force=force
    )
    logging.getLogger("app").setLevel(level)
    # httpx logs every request at INFO: the gateway logs its batches itself.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level)))
