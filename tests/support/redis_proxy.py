"""A loopback TCP proxy that injects link faults between a process and Redis (or any server).

Stopping or freezing Redis hurts every client at once; the faults that break cross-process
coordination are often on one process's link only: a connection cut, a slow link, or a
flow a NAT or a failover dropped without telling either end (a *silent* link: both
sockets stay open and nothing arrives). One `Proxy` stands in front of one process's
Redis link, so a test can do that to it alone:

    proxy = Proxy(target_port=redis.port)
    await proxy.start()                   # clients connect to proxy.url instead
    proxy.cut()                           # close every connection, refuse new ones
    proxy.delay(0.8)                      # hold every chunk 0.8 s (both ways)
    proxy.silence()                       # every connection, new ones too, forwards nothing
    proxy.silence(proxy.links_sending(b"SUBSCRIBE")[0])   # only the subscriber's link
    proxy.silence_when(b"SUBSCRIBE")      # any link, from the chunk that carries it on
    proxy.delay_when(b"EVALSHA", 0.6)     # any link, from that chunk on, both ways
    proxy.restore()                       # new connections pass again
    await proxy.close()

A silenced link drops what it reads (a dropped flow does not come back), so it stays
silent after `restore()`: the client has to notice and reconnect, as it would have to in
production. Self-contained on purpose (the standard library only), so the chaos harness
can reuse it as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["pass", "cut", "delay", "silent"]

CHUNK = 65536
SEEN_MAX = 4096
"""Bytes of each link's client-to-server traffic kept, to tell its connections apart."""


@dataclass(eq=False)
class Link:
    """One client connection and its own connection to the target."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    sent: bytearray = field(default_factory=bytearray)
    """The first SEEN_MAX bytes the client sent (e.g. b"SUBSCRIBE" marks a subscriber)."""
    silent: bool = False
    delay_s: float = 0.0
    """This link's own delay (set by `delay_when`), on top of the proxy's."""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.server):
            transport = writer.transport
            if not transport.is_closing():
                transport.abort()  # an RST, not a polite FIN: what a cut link looks like


class Proxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`, with faults on demand."""

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.mode: Mode = "pass"
        self.delay_s = 0.0
        self.links: list[Link] = []
        """Open links, oldest first."""
        self.silence_marker: bytes | None = None
        self.delay_marker: tuple[bytes, float] | None = None
        self.accepted = 0
        self.refused = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """A redis:// URL through the proxy."""
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> int:
        """Listen on a free loopback port; returns it."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop listening and close every link."""
        if self._server is not None:
            self._server.close()
        links, self.links = self.links, []
        tasks = [task for link in links for task in link.tasks]
        for link in links:
            link.abort()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await self._server.wait_closed()
            self._server = None

    # ---- faults -----------------------------------------------------------------------

    def restore(self) -> None:
        """New connections and data pass again (silenced links stay silent: see above)."""
        self.mode = "pass"
        self.delay_s = 0.0
        self.silence_marker = None
        self.delay_marker = None
        for link in self.links:
            link.delay_s = 0.0

    def cut(self) -> None:
        """Close every connection (RST) and refuse new ones until `restore()`."""
        self.mode = "cut"
        links, self.links = self.links, []
        for link in links:
            link.abort()

    def delay(self, seconds: float) -> None:
        """Hold every chunk read from now on `seconds` before forwarding it, both ways."""
        self.mode = "delay"
        self.delay_s = seconds

    def silence(self, link: Link | None = None) -> None:
        """Forward nothing on `link`, or on every link (new ones too) when None."""
        if link is not None:
            link.silent = True
            return
        self.mode = "silent"
        for each in self.links:
            each.silent = True

    def silence_when(self, marker: bytes) -> None:
        """Silence any link (open or new) from the first chunk its client sends that
        carries `marker`, that chunk included (a link that drops a SUBSCRIBE)."""
        self.silence_marker = marker

    def delay_when(self, marker: bytes, seconds: float) -> None:
        """Delay any link (open or new) by `seconds`, both ways, from the first chunk its
        client sends that carries `marker`: a request that reaches the server after its
        client gave up (a claim that timed out after Redis ran it)."""
        self.delay_marker = (marker, seconds)

    def links_sending(self, marker: bytes) -> list[Link]:
        """Open links whose client sent `marker` (among its first SEEN_MAX bytes)."""
        return [link for link in self.links if marker in link.sent]

    # ---- forwarding -------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "cut":
            self.refused += 1
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            self.refused += 1
            writer.transport.abort()
            return
        self.accepted += 1
        link = Link(writer, upstream_writer, silent=self.mode == "silent")
        self.links.append(link)
        link.tasks = [
            asyncio.create_task(self._pump(link, reader, upstream_writer, outbound=True)),
            asyncio.create_task(self._pump(link, upstream_reader, writer, outbound=False)),
        ]

    async def _pump(
        self,
        link: Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        outbound: bool,
    ) -> None:
        """Copy one direction; a delayed chunk keeps its place (a writer task sends in order)."""
        due: deque[tuple[float, bytes]] = deque()
        ready = asyncio.Event()
        sender = asyncio.create_task(self._send(due, ready, writer))
        clean = False
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    clean = True
                    break
                if outbound and len(link.sent) < SEEN_MAX:
                    link.sent += data[: SEEN_MAX - len(link.sent)]
                marker = self.silence_marker
                if outbound and marker is not None and marker in data:
                    link.silent = True
                delayed = self.delay_marker
                if outbound and delayed is not None and delayed[0] in data:
                    link.delay_s = delayed[1]
                if link.silent:
                    continue  # a dropped flow: read and forget
                delay = link.delay_s + (self.delay_s if self.mode == "delay" else 0.0)
                due.append((time.monotonic() + delay, data))
                ready.set()
        except (ConnectionError, OSError):
            pass
        finally:
            # What was read goes out first, then the end: a FIN after a clean end (the
            # peer reads everything, as over TCP), an RST after an error.
            due.append((0.0, b""))
            ready.set()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.delay_s + link.delay_s + 1):
                    await asyncio.shield(sender)
            sender.cancel()
            if clean and not link.silent:
                with contextlib.suppress(Exception):
                    writer.close()
            else:
                link.abort()
            if all(t.done() or t is asyncio.current_task() for t in link.tasks):
                link.abort()
                if link in self.links:
                    self.links.remove(link)

    async def _send(
        self, due: deque[tuple[float, bytes]], ready: asyncio.Event, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                await ready.wait()
                ready.clear()
                while due:
                    at, data = due[0]
                    wait = at - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    due.popleft()
                    if not data:
                        return
                    writer.write(data)
                    await writer.drain()
