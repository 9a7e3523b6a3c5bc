"""An open gateway (no API keys) serves this machine only: protected mode and web-page guards.

Protected mode, like Redis': without keys, and unless AUTH_DISABLED=true says open is
meant, the gateway serves only requests that reach it on a loopback address. It is judged
on the socket each request really came in on (ASGI `scope["server"]`), so it holds however
the server was started: `python -m app` (which also refuses a non-loopback HOST before
binding), `uvicorn app.main:app --host 0.0.0.0`, several workers, a socket handed over by
a process manager. `watch_listeners` says so in the log as soon as the server listens.

Web pages: the operator's browser runs pages from anywhere, and they can send it requests
to loopback. A page on another origin cannot hide its `Origin` (or, on a plain GET, the
browser's `Sec-Fetch-Site`), and a page that rebinds its own name to 127.0.0.1 sends that
name as `Host`. Either is refused; JSON routes also refuse non-JSON bodies
(`app.http.schemas.common.require_json`), so no form or plain `fetch` gets through.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import stat
from collections.abc import Iterable

from app.config import Settings
from app.errors import ConfigError, Forbidden

log = logging.getLogger("app")

LOOPBACK_NAMES = frozenset({"localhost"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PROBES = frozenset({"/healthz", "/readyz"})
# Sec-Fetch-Site values a browser sends for the gateway's own pages and for what the
# user typed or bookmarked; `same-site` is another port or subdomain: another origin.
OWN_FETCH_SITES = frozenset({b"same-origin", b"none"})
_SEEN_MAX = 256
WATCH_S = 10.0
"""How long after start-up `watch_listeners` looks for the server's sockets."""


def open_refusal(address: str) -> str:
    return (
        f"refusing to serve without API keys on {address}, which other machines can reach: "
        "set API_KEYS (or API_KEYS_FILE), or set AUTH_DISABLED=true if the service is "
        "meant to be open"
    )


def check_protected_mode(settings: Settings, *, open_: bool) -> None:
    """Refuse to start open on a HOST other machines can reach, unless told to (what
    `python -m app` binds is known before it binds)."""
    if open_ and not settings.auth_disabled and not loopback(settings.host):
        raise ConfigError(open_refusal(f"HOST={settings.host}"))


def loopback(host: str) -> bool:
    """`localhost` or a loopback address (IPv4-mapped IPv6 ones too)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


class LocalOnly:
    """What an open gateway refuses: a request on a reachable socket (protected mode, unless
    AUTH_DISABLED), a `Host` that is not this machine (DNS rebinding), and a request a page
    on another origin sent.

    It runs on every request of an open gateway, so the sockets and `Host` values once
    judged allowed are remembered (a few hundred at most: refused ones are judged each
    time) and the middleware asks only about what it has not seen.
    """

    def __init__(self, allowed_hosts: Iterable[str], *, protect: bool) -> None:
        self.allowed = {h.strip().lower().rstrip(".") for h in allowed_hosts if h.strip()}
        self.seen: set[object] = {None}
        """Host values and server sockets judged allowed (None: no Host header, or a Unix
        socket; no browser sends the first, no other machine reaches the second)."""
        self.protect = protect
        self._told = False

    def refusal(
        self,
        method: str,
        path: str,
        server: object,
        host: bytes | None,
        origin: bytes | None,
        fetch_site: bytes | None,
    ) -> Forbidden | None:
        """Why this request may not be served open, or None."""
        if path in PROBES:
            return None  # a load balancer or Docker calls them by any name; they spend nothing
        if server not in self.seen:
            if self.protect and not _loopback_socket(server):
                return self._reachable(server)
            self._remember(server)
        if host not in self.seen:
            if not self.host_allowed(host or b""):
                shown = (host or b"").decode("latin-1")[:100]
                return Forbidden(
                    f"Host {shown!r} is not this machine: without API_KEYS the gateway serves "
                    "only loopback names (localhost, 127.0.0.1, [::1]); add the name to "
                    "ALLOWED_HOSTS, or set API_KEYS"
                )
            self._remember(host)
        if origin is None and fetch_site is None:
            return None
        if method in SAFE_METHODS and not path.startswith("/api/") and path != "/metrics":
            return None  # a page or the health: reading it spends nothing, shows nothing
        if origin is not None and not _same_origin(origin, host):
            where = origin.decode("latin-1")[:100]
        elif fetch_site is not None and fetch_site not in OWN_FETCH_SITES:
            where = f"a {fetch_site.decode('latin-1')[:20]} page"
        else:
            return None
        return Forbidden(
            f"a request from {where} is refused: without API_KEYS the gateway serves only "
            "its own pages (set API_KEYS to serve other origins with a key)"
        )

    def host_allowed(self, value: bytes) -> bool:
        """A `Host` header naming this machine (loopback) or one of ALLOWED_HOSTS."""
        try:
            text = value.decode("ascii").strip().lower()
        except UnicodeDecodeError:
            return False
        if text.startswith("["):
            name, closed, rest = text[1:].partition("]")
            if not closed or (rest and not rest.startswith(":")):
                return False
            port = rest[1:]
        else:
            name, _, port = text.partition(":") if text.count(":") == 1 else (text, "", "")
        if port and not port.isdigit():
            return False
        name = name.rstrip(".")
        return bool(name) and (name in self.allowed or loopback(name))

    def _remember(self, value: object) -> None:
        if len(self.seen) < _SEEN_MAX:
            self.seen.add(value)

    def _reachable(self, server: object) -> Forbidden:
        message = open_refusal(_shown(server))
        if not self._told:  # once: every refused request would repeat it
            self._told = True
            log.error("%s; requests that reach it there are refused", message)
        return Forbidden(message)


def _loopback_socket(server: object) -> bool:
    return (
        isinstance(server, (tuple, list)) and bool(server) and loopback(str(server[0]))
    ) or server is None


def _shown(server: object) -> str:
    if isinstance(server, (tuple, list)) and len(server) >= 2:
        host = str(server[0])
        return f"[{host}]:{server[1]}" if ":" in host else f"{host}:{server[1]}"
    return str(server)


def _same_origin(origin: bytes, host: bytes | None) -> bool:
    """`Origin` (scheme://host[:port]) names the host the request was sent to."""
    if host is None:
        return False
    scheme, sep, netloc = origin.lower().partition(b"://")
    return bool(sep) and scheme in (b"http", b"https") and netloc == host.strip().lower()


def listening_sockets() -> list[tuple[str, int]]:
    """The (address, port) of every TCP socket this process listens on, however it got
    them (bound here, inherited from a parent, passed by a process manager)."""
    found = []
    for fd in _open_fds():
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with sock:
            try:
                if sock.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
                    socket.SOL_SOCKET, socket.SO_ACCEPTCONN
                ):
                    continue
                name = sock.getsockname()
            except OSError:
                continue
        found.append((str(name[0]), int(name[1])))
    return found


def _open_fds() -> list[int]:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return [int(name) for name in os.listdir(folder)]
        except (OSError, ValueError):
            continue
    return []


async def watch_listeners(poll_s: float = 0.25) -> None:
    """Say in the log, as soon as the server listens (it binds after the lifespan starts),
    that an open gateway on a reachable address serves this machine only."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WATCH_S
    while loop.time() < deadline:
        listening = listening_sockets()  # a directory listing and a few fstat calls
        reachable = [s for s in listening if not loopback(s[0])]
        if reachable:
            log.error(
                "%s; only requests on a loopback address are served",
                open_refusal(", ".join(_shown(s) for s in reachable)),
            )
            return
        if listening:
            return
        await asyncio.sleep(poll_s)
