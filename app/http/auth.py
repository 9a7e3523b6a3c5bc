"""Who is calling: API keys with roles, compared in constant time, and protected mode.

A key is sent as `X-API-Key: <key>` or `Authorization: Bearer <key>`. Keys are held as
SHA-256 digests: the one dict look-up by digest leaks nothing useful through its timing,
and the match is confirmed with `hmac.compare_digest`. Only a key's `name` is ever logged,
echoed or exported. With no keys configured the service is open: every caller is an
admin named after its address, and `check_protected_mode` refuses that on a
non-loopback HOST unless AUTH_DISABLED=true says it is meant. An open gateway also
serves only its own machine's pages (`LocalOnly`): a page from elsewhere that the
operator's browser runs cannot drive it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from app.config import Settings
from app.errors import ConfigError, Forbidden, Unauthorized

Role = Literal["read", "crawl", "admin"]
ROLES: tuple[Role, ...] = ("read", "crawl", "admin")
RANK = {role: rank for rank, role in enumerate(ROLES)}


@dataclass(frozen=True, slots=True)
class Client:
    """A caller as the gateway knows it: a name for logs and limits, and a role."""

    name: str
    role: Role

    def require(self, role: Role) -> Client:
        """This client, or Forbidden naming the role the call needs."""
        if RANK[self.role] < RANK[role]:
            raise Forbidden(
                f"this call needs the {role!r} role; key {self.name!r} is {self.role!r}"
            )
        return self


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One configured key: its name, role, and the SHA-256 digest of the secret."""

    name: str
    role: Role
    digest: bytes


def parse_keys(text: str, *, source: str) -> list[ApiKey]:
    """Entries `name:key[:role]`, separated by commas or lines; `#` starts a comment."""
    keys: list[ApiKey] = []
    names: set[str] = set()
    for raw in text.replace(",", "\n").splitlines():
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise ConfigError(f"{source}: an entry must be name:key or name:key:role")
        name, secret = parts[0], parts[1]
        role = parts[2] if len(parts) == 3 else "read"
        if role not in RANK:
            raise ConfigError(f"{source}: key {name!r} has role {role!r}; use read, crawl or admin")
        if name in names:
            raise ConfigError(f"{source}: key name {name!r} is used twice")
        if len(secret) < 16:
            raise ConfigError(f"{source}: key {name!r} is shorter than 16 characters")
        names.add(name)
        keys.append(ApiKey(name, role, hashlib.sha256(secret.encode()).digest()))
    return keys


def load_keys(settings: Settings) -> list[ApiKey]:
    """The keys of API_KEYS and API_KEYS_FILE together."""
    keys: list[ApiKey] = []
    if settings.api_keys is not None:
        keys += parse_keys(settings.api_keys.get_secret_value(), source="API_KEYS")
    if settings.api_keys_file is not None:
        path: Path = settings.api_keys_file
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"API_KEYS_FILE: cannot read {path}: {exc.strerror}") from exc
        keys += parse_keys(text, source="API_KEYS_FILE")
    if len({key.name for key in keys}) != len(keys):
        raise ConfigError("API_KEYS and API_KEYS_FILE name the same key twice")
    return keys


class KeyRing:
    """Identifies callers by their key; open (everyone an admin) when it holds none."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._by_digest = {key.digest: key for key in keys}
        self.open = not keys

    def identify(self, headers: list[tuple[bytes, bytes]], address: str) -> Client:
        """The caller of a request with these ASGI headers; Unauthorized or Forbidden."""
        if self.open:
            return Client(f"ip:{address}", "admin")
        secret = presented_key(headers)
        if secret is None:
            raise Unauthorized("send an API key as X-API-Key or Authorization: Bearer")
        digest = hashlib.sha256(secret).digest()
        key = self._by_digest.get(digest)
        if key is None or not hmac.compare_digest(key.digest, digest):
            raise Forbidden("unknown API key")
        return Client(key.name, key.role)


def presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key in `X-API-Key` or `Authorization: Bearer`, if any."""
    for name, value in headers:
        if name == b"x-api-key" and value:
            return value
        if name == b"authorization" and value[:7].lower() == b"bearer " and value[7:].strip():
            return value[7:].strip()
    return None


def check_protected_mode(settings: Settings, ring: KeyRing) -> None:
    """Refuse to serve open on an address other machines can reach, unless told to."""
    if not ring.open or settings.auth_disabled or _loopback(settings.host):
        return
    raise ConfigError(
        f"refusing to serve without API keys on HOST={settings.host}, which other machines "
        "can reach: set API_KEYS (or API_KEYS_FILE), or set AUTH_DISABLED=true if the "
        "service is meant to be open"
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


LOOPBACK_NAMES = frozenset({"localhost"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PROBES = frozenset({"/healthz", "/readyz"})
# Sec-Fetch-Site values a browser sends for the gateway's own pages and for what the
# user typed or bookmarked; `same-site` is another port or subdomain: another origin.
OWN_FETCH_SITES = frozenset({b"same-origin", b"none"})
_SEEN_HOSTS_MAX = 256


class LocalOnly:
    """Open mode's guard against web pages: DNS rebinding (a foreign `Host`) and requests a
    page on another origin makes the operator's browser send (`Origin`, `Sec-Fetch-Site`).

    `refusal` runs on every request of an open gateway, so a `Host` value once judged
    allowed is remembered (a few hundred at most: refused ones are judged each time).
    """

    def __init__(self, allowed_hosts: Iterable[str]) -> None:
        self.allowed = {h.strip().lower().rstrip(".") for h in allowed_hosts if h.strip()}
        self.seen: set[bytes | None] = {None}
        """Host values judged allowed (None: no Host header, which no browser sends)."""

    def refusal(
        self,
        method: str,
        path: str,
        host: bytes | None,
        origin: bytes | None,
        fetch_site: bytes | None,
    ) -> Forbidden | None:
        """Why this request may not be served open, or None."""
        if host is not None and host not in self.seen:
            if not self.host_allowed(host):
                if path in PROBES:
                    return None
                shown = host.decode("latin-1")[:100]
                return Forbidden(
                    f"Host {shown!r} is not this machine: without API_KEYS the gateway serves "
                    "only loopback names (localhost, 127.0.0.1, [::1]); add the name to "
                    "ALLOWED_HOSTS, or set API_KEYS"
                )
            if len(self.seen) < _SEEN_HOSTS_MAX:
                self.seen.add(host)
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
            name, _, rest = text[1:].partition("]")
            port = rest.removeprefix(":") if rest else ""
            if rest and not rest.startswith(":"):
                return False
        else:
            name, _, port = text.partition(":") if text.count(":") == 1 else (text, "", "")
        if port and not port.isdigit():
            return False
        name = name.rstrip(".")
        return name in LOOPBACK_NAMES or name in self.allowed or _loopback(name)


def _same_origin(origin: bytes, host: bytes | None) -> bool:
    """`Origin` (scheme://host[:port]) names the host the request was sent to."""
    if host is None:
        return False
    scheme, sep, netloc = origin.lower().partition(b"://")
    return bool(sep) and scheme in (b"http", b"https") and netloc == host.strip().lower()
