"""The deployment under test: a real redis-server, three gateway servers on it, each through
its own loopback proxy, the simulator keeping the ledger, and the callback receiver; and
the faults, applied to it and undone.

Servers: A and B are `python -m app` with one process each; W is `python -m app` with
WORKERS=2 (two uvicorn workers behind one port, one proxy: a link fault on W hits both).
All share one SQLite file, as replicas share a store. The pid of every gateway process
that ever ran (restarts and uvicorn's replacement workers included) is kept with its
server, so the ledger's `pid` tells which server made each call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

from tests.chaos.receiver import CallbackReceiver
from tests.chaos.schedule import SERVERS, Fault
from tests.support.procs import Process, RedisServer, free_port, gateway_process
from tests.support.redis_proxy import Proxy

PREFIX = "fl"
LEASE_S = 2.0
REDIS_TIMEOUT_S = 0.5
WAIT_TIMEOUT_S = 4.0
PER_MIN = 30
PER_HOUR = 300
WEBHOOK_SECRET = "chaos-webhook-secret-0123456789"
SIM_LATENCY_MS = 50
PROCESSES = 4
"""A, B and W's two workers."""
STARTUP_S = 60.0
"""A gateway's start on a loaded 2-core machine (W starts two workers)."""


def gateway_settings(redis_url: str) -> dict[str, str]:
    """The settings every gateway of the run gets (a budget small enough that its windows
    matter, a short lease so takeovers happen within a run, a short deadline)."""
    return {
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": PREFIX,
        "FLIGHT_LEASE_S": str(LEASE_S),
        "REDIS_TIMEOUT_S": str(REDIS_TIMEOUT_S),
        "WAIT_TIMEOUT_S": str(WAIT_TIMEOUT_S),
        "UPSTREAM_RATE_PER_MIN": str(PER_MIN),
        "UPSTREAM_RATE_PER_HOUR": str(PER_HOUR),
        "UPSTREAM_RESERVE_PER_MIN": "6",
        "UPSTREAM_RESERVE_PER_HOUR": "60",
        "UPSTREAM_BURST": "10",
        "UPSTREAM_TIMEOUT_S": "5",
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "WEBHOOK_ALLOW_PRIVATE": "true",  # the receiver listens on loopback
        "SHUTDOWN_GRACE_S": "2",
        "LOG_LEVEL": "INFO",
    }


@dataclass
class FaultRecord:
    """A fault as it happened: when it began and ended (the ledger's clock), on which
    processes."""

    fault: Fault
    start: float = 0.0
    end: float = 0.0
    pids: tuple[int, ...] = ()
    note: str = ""


@dataclass
class Cluster:
    """Everything the run starts, and what it knows about the processes."""

    work: Path
    redis: RedisServer = field(init=False)
    simulator: Process = field(init=False)
    receiver: CallbackReceiver = field(init=False)
    proxies: dict[str, Proxy] = field(default_factory=dict)
    servers: dict[str, Process] = field(default_factory=dict)
    pids: dict[int, str] = field(default_factory=dict)
    """Every gateway pid seen, with its server."""
    dead: dict[int, float] = field(default_factory=dict)
    """Pids killed (by a fault or by uvicorn's supervisor), with when they were seen dead."""
    _watch: asyncio.Task[None] | None = None

    @property
    def ledger_path(self) -> Path:
        return self.work / "ledger.ndjson"

    async def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "redis").mkdir(exist_ok=True)
        self.redis = RedisServer(self.work / "redis")
        await asyncio.to_thread(self.redis.start)
        port = free_port()
        args = [sys.executable, "-m", "app.simulator", "--port", str(port)]
        args += ["--latency-ms", str(SIM_LATENCY_MS), "--ledger", str(self.ledger_path)]
        self.simulator = Process(args, port, self.work / "simulator.log", cwd=self.work)
        await asyncio.to_thread(self.simulator.start, "/_sim/stats")
        self.receiver = CallbackReceiver(WEBHOOK_SECRET)
        await self.receiver.start()
        for name in SERVERS:
            proxy = self.proxies[name] = Proxy(self.redis.port)
            await proxy.start()
            env = gateway_settings(proxy.url)
            if name == "W":
                env["WORKERS"] = "2"
            process = gateway_process(self.work, self.simulator, **env)
            process.log = self.work / f"gateway-{name}.log"
            self.servers[name] = process
        self._watch = asyncio.create_task(self._watch_pids(), name="pid-watch")
        await asyncio.gather(
            *(asyncio.to_thread(p.start, "/healthz", STARTUP_S) for p in self.servers.values())
        )
        await self.until_coordinated(within_s=30)

    async def until_coordinated(self, within_s: float) -> None:
        """Until every server says Redis coordinates PROCESSES processes and is healthy."""
        deadline = time.monotonic() + within_s
        async with httpx.AsyncClient(timeout=2) as http:
            while True:
                seen = []
                for name, process in self.servers.items():
                    with contextlib.suppress(httpx.HTTPError, ValueError):
                        body = (await http.get(f"{process.url}/")).json()
                        seen.append((name, body.get("processes"), body.get("status")))
                if len(seen) == len(self.servers) and all(
                    count == PROCESSES and status == "healthy" for _, count, status in seen
                ):
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"the deployment did not come together: {seen}")
                await asyncio.sleep(0.2)

    async def stop(self) -> None:
        """Stop everything started, whatever state a fault or a failed start left it in."""
        if not hasattr(self, "redis"):
            return
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for proxy in self.proxies.values():
            proxy.restore()
        self.resume_everything()
        self.note_pids()
        await asyncio.gather(
            *(asyncio.to_thread(_stop, p) for p in self.servers.values()),
            return_exceptions=True,
        )
        for pid in self.pids:  # a worker whose supervisor was killed is left orphaned
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for proxy in self.proxies.values():
            await proxy.close()
        if hasattr(self, "receiver"):
            await self.receiver.close()
        if hasattr(self, "simulator"):
            await asyncio.to_thread(_stop, self.simulator)
        self.redis.stop()

    def resume_everything(self) -> None:
        """SIGCONT to every process a fault may have left stopped."""
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        redis = getattr(self, "redis", None)
        if redis is not None and redis.process is not None and redis.process.poll() is None:
            redis.thaw()

    # ---- processes --------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        """W's uvicorn workers now (children of its supervisor started by spawn)."""
        if self.servers["W"].popen is None:
            return []
        master = self.servers["W"].pid
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == master and b"spawn_main" in cmdline:
                found.append(int(entry.name))
        return sorted(found)

    def server_pids(self, name: str) -> list[int]:
        """The gateway processes of one server now."""
        if name == "W":
            return self.worker_pids()
        return [self.servers[name].pid] if self.servers[name].popen is not None else []

    async def _watch_pids(self) -> None:
        """Learn every gateway pid as it appears (restarts, replaced workers)."""
        while True:
            self.note_pids()
            await asyncio.sleep(0.25)

    def note_pids(self) -> None:
        for name in self.servers:
            for pid in self.server_pids(name):
                self.pids.setdefault(pid, name)
        for pid in self.pids:
            if pid not in self.dead and not _alive(pid):
                self.dead[pid] = time.time()

    # ---- faults -----------------------------------------------------------------------

    async def apply(self, fault: Fault) -> FaultRecord:
        """Inflict `fault`, hold it for its duration, undo it; what happened, timed."""
        record = FaultRecord(fault)
        kind, target = fault.kind, fault.target
        record.start = time.time()
        if kind == "pause":
            assert target is not None
            pid = self.server_pids(target)[0]
            record.pids = (pid,)
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(fault.for_s)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        elif kind == "kill":
            assert target is not None
            record.pids = await self._kill(target, fault.for_s)
        elif kind == "redis-restart":
            await asyncio.to_thread(self.redis.stop)
            await asyncio.sleep(fault.for_s)
            await asyncio.to_thread(self.redis.start)
        elif kind == "redis-freeze":
            self.redis.freeze()
            await asyncio.sleep(fault.for_s)
            self.redis.thaw()
        elif kind == "pubsub-kill":
            client = Redis(host="127.0.0.1", port=self.redis.port, socket_timeout=2)
            try:
                killed = await client.client_kill_filter(_type="pubsub")
                record.note = f"{killed} subscriptions killed"
            finally:
                await client.aclose()
        else:
            assert target is not None
            proxy = self.proxies[target]
            record.pids = tuple(self.server_pids(target))
            if kind == "link-cut":
                proxy.cut()
            elif kind == "link-delay":
                proxy.delay(fault.delay_s)
            else:
                proxy.silence()
            await asyncio.sleep(fault.for_s)
            proxy.restore()
        record.end = time.time()
        return record

    async def _kill(self, target: str, down_s: float) -> tuple[int, ...]:
        """SIGKILL one process of `target`; A and B are started again after `down_s`
        (W's supervisor replaces its worker by itself)."""
        if target == "W":
            pid = self.worker_pids()[0]
            os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(down_s)
            return (pid,)
        process = self.servers[target]
        pid = process.pid
        assert process.popen is not None
        process.popen.kill()
        await asyncio.to_thread(process.popen.wait, 10)
        self.dead[pid] = time.time()
        await asyncio.sleep(down_s)
        await asyncio.to_thread(process.start, "/healthz", STARTUP_S)
        self.note_pids()
        return (pid,)

    # ---- reading the processes --------------------------------------------------------

    async def get_json(self, http: httpx.AsyncClient, name: str, path: str) -> Any:
        response = await http.get(f"{self.servers[name].url}{path}")
        response.raise_for_status()
        return response.json()

    async def lease_keys(self) -> dict[str, tuple[str, int]]:
        """Every per-id lease in Redis now, with its token and milliseconds left."""
        client = Redis(host="127.0.0.1", port=self.redis.port, socket_timeout=5)
        try:
            found: dict[str, tuple[str, int]] = {}
            async for key in client.scan_iter(match=f"{PREFIX}:{{*}}:lease", count=1000):
                token = await client.get(key)
                ttl = await client.pttl(key)
                if token is not None:
                    found[_text(key)] = (_text(token), int(ttl))
            return found
        finally:
            await client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _stop(process: Process) -> None:
    with contextlib.suppress(AssertionError):
        if process.popen is not None:
            process.stop()
