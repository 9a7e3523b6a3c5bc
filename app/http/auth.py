"""Who is calling: API keys with roles, compared in constant time, and protected mode.

A key is sent as `X-API-Key: <key>` or `Authorization: Bearer <key>`. Keys are held as
SHA-256 digests: the one dict look-up by digest leaks nothing useful through its timing,
and the match is confirmed with `hmac.compare_digest`. Only a key's `name` is ever logged,
echoed or exported. With no keys configured the service is open: every caller is an
admin named after its address, and `app.http.local_only` keeps it to this machine.
"""

from __future__ import annotations

import hashlib
import hmac
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


def parse_keys(text: str, *, source: str, comments: bool = False) -> list[ApiKey]:
    """Entries `name:key[:role]`, separated by commas or lines. With `comments` (a keys
    file), a line whose first character (after blanks) is `#` is a comment; a `#` anywhere
    else is part of the entry, so a key may hold one."""
    keys: list[ApiKey] = []
    names: set[str] = set()
    lines = text.splitlines()
    if comments:
        lines = [line for line in lines if not line.lstrip().startswith("#")]
    for raw in ",".join(lines).split(","):
        entry = raw.strip()
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
        keys += parse_keys(text, source="API_KEYS_FILE", comments=True)
    if len({key.name for key in keys}) != len(keys):
        raise ConfigError("API_KEYS and API_KEYS_FILE name the same key twice")
    return keys


class KeyRing:
    """Identifies callers by their key; open (everyone an admin) when it holds none."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._by_digest = {key.digest: key for key in keys}
        self.open = not keys
        self.names = frozenset(key.name for key in keys)

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
