"""The Redis client the coordination shares: bounded calls, never retried blindly."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig

# After a failed call, how long Redis is left alone (the process works alone meanwhile).
RETRY_AFTER_FAILURE_S = 2.0


def connect(url: str, timeout_s: float) -> Redis:
    """A client whose every call gives up after `timeout_s` and is never retried blindly.

    Its pool checks each idle connection before handing it out, and reconnects one the
    server closed (a Redis restart closes them all). redis-py 8 skips that check while
    "maintenance notifications" (Redis Enterprise's) are on, and their default, "auto",
    counts as on: after a restart, each stale connection failed the call that drew it,
    seconds or minutes later, and each such failure sent the process back to fetching
    alone for RETRY_AFTER_FAILURE_S (ids fetched twice, the budget spent by share). A
    plain Redis sends no such notifications, so they are turned off.
    """
    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )


async def bounded(awaitable: Awaitable[Any], timeout_s: float) -> Any:
    """`awaitable` within `timeout_s`, a timeout raised as a RedisError."""
    try:
        async with asyncio.timeout(timeout_s):
            return await awaitable
    except TimeoutError as exc:
        raise RedisError("timed out") from exc


async def keep_running(loop: Callable[[], Awaitable[Any]], name: str) -> None:
    """Run a background loop for ever: an unexpected error restarts it (logged)."""
    while True:
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except Exception:
            logging.getLogger("app.coordination").exception("Redis %s failed; restarting it", name)
        await asyncio.sleep(0.5)


async def stop_tasks(tasks: set[asyncio.Task[None]]) -> None:
    """Cancel `tasks` and wait until they end, cancelling again any that went on: a
    cancellation that meets a timeout expiring inside redis-py can come out as a timeout
    (nested `asyncio.timeout`s in Python 3.11), and a loop that handles timeouts then
    carries on. Bounded: a task still running after 50 tries is left, and logged."""
    pending = {task for task in tasks if not task.done()}
    for _ in range(50):
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.2)
    logging.getLogger("app.coordination").error("tasks did not stop: %s", pending)
