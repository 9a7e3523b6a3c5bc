"""Where a job's callback may go: the URL's shape, the addresses its host resolves to, and
an attempt that connects to the very address it checked.

A callback URL is the client's to choose and the gateway makes the request, so without
checks a `crawl` key could make the gateway probe its own network (127.0.0.1, the cloud's
169.254.169.254, private ranges) and read the answers back from the job. Loopback,
link-local, private, shared, multicast, reserved and unspecified addresses are refused
(unless WEBHOOK_ALLOW_PRIVATE=true, for tests and in-house receivers), at submission and
again at each attempt. An attempt resolves the host once and connects to that address,
with the URL's name as Host and TLS server name, so a name that resolves elsewhere
between the check and the connection (DNS rebinding) cannot redirect it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import httpx

from app.errors import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.ip_network("64:ff9b::/96")
RESOLVE_TIMEOUT_S = 5.0


class CallbackRefused(Exception):
    """The callback URL may not be called; the message says why (shown to its owner)."""


def parse(url: str) -> httpx.URL:
    """The URL as httpx will send it: http(s) with a host; CallbackRefused otherwise."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise CallbackRefused(f"not a URL httpx can send ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise CallbackRefused("must be an http or https URL with a host")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise CallbackRefused(f"its port must be 1 to 65535, not {parsed.port}")
    return parsed


def forbidden(address: IPAddress) -> bool:
    """True for an address a callback may not reach: anything but a public unicast one,
    an IPv4 address inside an IPv6 one (mapped, NAT64, 6to4, Teredo) judged as itself."""
    if isinstance(address, ipaddress.IPv6Address):
        teredo = address.teredo
        embedded = address.ipv4_mapped or address.sixtofour or (teredo and teredo[1])
        if embedded is None and address in NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded:
            return forbidden(embedded)
    return (
        not address.is_global
        or address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


async def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, in the resolver's order (an address stays itself)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(RESOLVE_TIMEOUT_S):
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def checked_address(url: httpx.URL, *, allow_private: bool) -> str:
    """The address to connect to for `url`: the first its host resolves to, once every
    address it resolves to is one a callback may reach; CallbackRefused otherwise."""
    host = url.host
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        addresses = await resolve(host, port)
    except (OSError, TimeoutError, UnicodeError) as exc:
        raise CallbackRefused(f"its host {host!r} does not resolve ({exc})") from None
    if not addresses:
        raise CallbackRefused(f"its host {host!r} does not resolve")
    if not allow_private:
        for text in addresses:
            address = ipaddress.ip_address(text.split("%", 1)[0])
            if forbidden(address):
                raise CallbackRefused(
                    f"its host {host!r} resolves to {address}, which is not a public address "
                    "(WEBHOOK_ALLOW_PRIVATE=true lets callbacks reach private networks)"
                )
    return addresses[0]


async def check_submitted(url: str, *, allow_private: bool) -> None:
    """A submission's callback URL: InvalidRequest (422) saying why it cannot be called."""
    try:
        await checked_address(parse(url), allow_private=allow_private)
    except CallbackRefused as exc:
        raise InvalidRequest(f"callback_url: {exc}") from None


def pinned(url: httpx.URL, address: str) -> tuple[httpx.URL, dict[str, str], dict[str, str]]:
    """The URL to request so that the connection goes to `address`, with the headers and
    request extensions that keep the URL's own name for Host and for TLS (SNI and the
    certificate's name)."""
    target = url.copy_with(host=address)
    host = url.host if ":" not in url.host else f"[{url.host}]"
    netloc = host if url.port is None else f"{host}:{url.port}"
    extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
    return target, {"Host": netloc}, extensions


def masked(url: str | None) -> str | None:
    """The URL with any credentials in it masked (`https://***@host/...`)."""
    if url is None:
        return None
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return "(not a valid URL)"
    if not parsed.userinfo:
        return url
    return str(parsed.copy_with(username="***", password=None))
