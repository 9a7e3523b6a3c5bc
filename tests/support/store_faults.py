"""A job store that fails at its n-th write: a crash or a store timeout between two writes.

The write points are found generically, not per method: on MongoDB every collection the
store holds is wrapped and each write call (insert, update, delete, find-and-modify,
bulk) is one write; on SQLite the connection is wrapped and each INSERT, UPDATE or DELETE
statement is one write. Any store method, however it is written, can so be stopped
between any two of its writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

MONGO_WRITES = frozenset(
    {
        "insert_one",
        "insert_many",
        "update_one",
        "update_many",
        "replace_one",
        "delete_one",
        "delete_many",
        "find_one_and_update",
        "find_one_and_replace",
        "find_one_and_delete",
        "bulk_write",
    }
)
SQL_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")


class Crash(BaseException):
    """The process died here: nothing after this point of the operation runs."""


class Fault(Enum):
    """How the failing write fails."""

    CRASH = "crash"
    """The process dies before the write reaches the database."""
    TIMEOUT = "timeout"
    """The write times out before it reaches the database; the process lives on."""
    LATE_TIMEOUT = "late-timeout"
    """The write reaches the database, then the client gives up waiting for the answer."""


@dataclass
class Faults:
    """Counts writes; the `fail_at`-th (1-based) fails as `fault` says, later ones pass."""

    fail_at: int | None = None
    fault: Fault = Fault.CRASH
    interleave: bool = False
    """Yield to the event loop before each write, so that concurrent operations
    interleave at their write points (mongomock never yields on its own)."""
    writes: list[str] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)
    """What each write that went through returned (a cursor, a DeleteResult...)."""

    def error(self) -> BaseException:
        return Crash() if self.fault is Fault.CRASH else TimeoutError("injected store timeout")

    async def write(self, name: str, call: Any) -> Any:
        """Run the write `call()` (a coroutine factory) with the fault, if it is this one."""
        if self.interleave:
            await asyncio.sleep(0)
        self.writes.append(name)
        failing = len(self.writes) == self.fail_at
        if failing and self.fault is not Fault.LATE_TIMEOUT:
            raise self.error()
        result = await call()
        self.results.append(result)
        if failing:
            raise self.error()
        return result


class FaultyCollection:
    """A collection whose write methods go through `faults`; everything else passes."""

    def __init__(self, inner: Any, faults: Faults) -> None:
        self._inner = inner
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in MONGO_WRITES:
            return attr

        async def write(*args: Any, **kwargs: Any) -> Any:
            return await self._faults.write(name, lambda: attr(*args, **kwargs))

        return write


class Statement:
    """A statement as aiosqlite gives it: awaited for its cursor, or entered so that the
    cursor is closed on the connection's thread when the block ends."""

    def __init__(self, run: Callable[[], Awaitable[Any]]) -> None:
        self._run = run
        self._cursor: Any = None

    def __await__(self) -> Generator[Any, None, Any]:
        return self._run().__await__()

    async def __aenter__(self) -> Any:
        self._cursor = await self._run()
        return self._cursor

    async def __aexit__(self, *exc: object) -> None:
        await self._cursor.close()


class FaultyConnection:
    """An aiosqlite connection whose write statements go through `faults`."""

    def __init__(self, inner: Any, faults: Faults) -> None:
        self._inner = inner
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def execute(self, sql: str, *args: Any) -> Statement:
        return Statement(lambda: self._maybe(sql, lambda: self._inner.execute(sql, *args)))

    def executemany(self, sql: str, *args: Any) -> Statement:
        return Statement(lambda: self._maybe(sql, lambda: self._inner.executemany(sql, *args)))

    async def _maybe(self, sql: str, call: Any) -> Any:
        verb = sql.lstrip().split(None, 1)[0].upper()
        if verb not in SQL_WRITES:
            return await call()
        return await self._faults.write(verb, call)


def inject(store: Any, faults: Faults) -> None:
    """Route every write of `store` (its collections, or its SQLite connection) via `faults`."""
    wrapped = 0
    for name, value in list(vars(store).items()):
        if hasattr(value, "insert_many") and hasattr(value, "find"):
            setattr(store, name, FaultyCollection(value, faults))
            wrapped += 1
        elif hasattr(value, "executemany") and hasattr(value, "commit"):
            setattr(store, name, FaultyConnection(value, faults))
            wrapped += 1
    assert wrapped, f"no collection or connection found on {type(store).__name__}"
