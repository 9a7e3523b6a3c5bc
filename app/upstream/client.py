"""One typed call to Freelancer's users API per method; failures raise `UpstreamError` kinds.

Retries, the budget and the circuit breaker wrap this client (`ResilientUpstream`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson

from app.clock import Clock, wall_clock
from app.config import Settings
from app.domain import UserRecord
from app.errors import (
    UpstreamAuthError,
    UpstreamBadResponse,
    UpstreamConnectError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamServerError,
    UpstreamTimeout,
    UserNotFound,
)
from app.upstream.base import UpstreamBatch

# Detail flags that make Freelancer include what a UserRecord needs (see shared notes:
# which flag turns on `location.country` is unverified, so both are requested).
DETAIL_PARAMS: tuple[tuple[str, str], ...] = (
    ("avatar", "true"),
    ("display_info", "true"),
    ("location_details", "true"),
    ("country_details", "true"),
)
DEFAULT_RETRY_AFTER_S = 1.0


def create_http_client(
    settings: Settings, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """The one HTTP client to Freelancer, with credentials and timeout from settings."""
    # The process id tells the calls of a deployment's processes apart at the other end
    # (the simulator's ledger, Freelancer's support); it says nothing about the host.
    agent = f"freelancer-user-gateway/0.1 (pid {os.getpid()})"
    headers = {"Accept": "application/json", "User-Agent": agent}
    if settings.freelancer_oauth_token is not None:
        headers["Freelancer-OAuth-V1"] = settings.freelancer_oauth_token.get_secret_value()
    elif settings.freelancer_client_id:
        headers["Freelancer-Developer-OAuth-Client-Id"] = settings.freelancer_client_id
    limits = httpx.Limits(max_connections=settings.upstream_concurrency + 2)
    return httpx.AsyncClient(
        headers=headers,
        timeout=httpx.Timeout(settings.upstream_timeout_s),
        limits=limits,
        transport=transport,
    )


class FreelancerClient:
    """Typed calls to `GET {base}/?users[]=…` and `GET {base}/{id}/`."""

    def __init__(
        self, http: httpx.AsyncClient, *, base_url: str, clock: Clock = wall_clock
    ) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._clock = clock

    async def fetch_users(self, user_ids: Sequence[int]) -> UpstreamBatch:
        """Look up many ids in ONE call; ids Freelancer leaves out of the map do not exist."""
        params: list[tuple[str, str | int | float | bool | None]] = [
            ("users[]", uid) for uid in user_ids
        ]
        params.extend(DETAIL_PARAMS)
        response = await self._get(f"{self._base}/", params)
        result = _result(response)
        users = result.get("users") if isinstance(result, dict) else None
        if not isinstance(users, dict):
            raise UpstreamBadResponse("Freelancer's batch answer has no `result.users` map")
        wanted = set(user_ids)
        now = self._clock()
        found: dict[int, UserRecord] = {}
        for key, raw in users.items():
            record = parse_user(raw, key=key, fetched_at=now)
            if record.user_id in wanted:
                found[record.user_id] = record
        return UpstreamBatch(found, _rate_remaining(response.headers))

    async def fetch_user(self, user_id: int) -> UserRecord:
        """Look up one id; raises UserNotFound when Freelancer says it does not exist."""
        try:
            response = await self._get(f"{self._base}/{user_id}/", list(DETAIL_PARAMS))
        except UpstreamRejected as exc:
            if exc.status == 404:
                raise UserNotFound(f"Freelancer has no user {user_id}") from exc
            raise
        return parse_user(_result(response), key=str(user_id), fetched_at=self._clock())

    async def _get(
        self, url: str, params: list[tuple[str, str | int | float | bool | None]]
    ) -> httpx.Response:
        try:
            response = await self._http.get(url, params=params)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(
                f"Freelancer did not answer in time ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            raise UpstreamConnectError(f"cannot reach Freelancer: {type(exc).__name__}") from exc
        status = response.status_code
        if status < 400:
            return response
        message = _error_message(response)
        if status == 429:
            raise UpstreamRateLimited(
                f"Freelancer rate limit: {message}",
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        if status in (401, 403):
            raise UpstreamAuthError(
                f"Freelancer refused the credentials ({status}: {message}); "
                "check FREELANCER_OAUTH_TOKEN / FREELANCER_CLIENT_ID"
            )
        if status >= 500:
            raise UpstreamServerError(f"Freelancer answered {status}: {message}")
        rejected = UpstreamRejected(f"Freelancer rejected the request ({status}: {message})")
        rejected.status = status
        raise rejected


def _result(response: httpx.Response) -> Any:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise UpstreamBadResponse("Freelancer answered with a body that is not JSON") from exc
    if not isinstance(body, dict) or body.get("status") != "success" or "result" not in body:
        raise UpstreamBadResponse("Freelancer's answer is not a success envelope")
    return body["result"]


def _error_message(response: httpx.Response) -> str:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.reason_phrase or "no message"
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])[:200]
    return response.reason_phrase or "no message"


def parse_retry_after(value: str | None) -> float:
    """Seconds to wait from a `Retry-After` header (seconds or an HTTP date)."""
    if not value:
        return DEFAULT_RETRY_AFTER_S
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return DEFAULT_RETRY_AFTER_S


def _rate_remaining(headers: Mapping[str, str]) -> int | None:
    # `RateLimit-Remaining: 45` (possibly a list like `45, 900`: the tightest one counts).
    value = headers.get("RateLimit-Remaining") or headers.get("X-RateLimit-Remaining")
    if not value:
        return None
    numbers = []
    for part in value.split(","):
        head = part.split(";")[0].strip()
        if head.isdigit():
            numbers.append(int(head))
    return min(numbers) if numbers else None


def _https(url: Any) -> str | None:
    if not isinstance(url, str) or not url:
        return None
    if url.startswith("//"):
        return "https:" + url
    if url.startswith("http://"):
        return "https://" + url[len("http://") :]
    if url.startswith("/"):
        return "https://www.freelancer.com" + url
    return url


# Unix seconds a date can be rendered from (years 1970 to 9999); anything else is junk.
_LATEST_TIMESTAMP = 253_402_300_799


def _timestamp(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0 <= value <= _LATEST_TIMESTAMP else None


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_user(raw: Any, *, key: str, fetched_at: float) -> UserRecord:
    """A Freelancer user object as a UserRecord; tolerant of missing optional fields."""
    if not isinstance(raw, dict):
        raise UpstreamBadResponse(f"Freelancer's user {key} is not an object")
    try:
        user_id = int(raw.get("id", key))
    except (TypeError, ValueError) as exc:
        raise UpstreamBadResponse(f"Freelancer's user {key} has no usable id") from exc
    location = _mapping(raw.get("location"))
    country = _mapping(location.get("country"))
    registered = raw.get("registration_date")
    return UserRecord(
        user_id=user_id,
        username=_text(raw.get("username")) or str(user_id),
        display_name=_text(raw.get("display_name")) or _text(raw.get("public_name")),
        country=_text(country.get("name")),
        city=_text(location.get("city")),
        role=_text(raw.get("chosen_role")) or _text(raw.get("role")),
        registration_date=_timestamp(registered),
        avatar_url=_https(raw.get("avatar_cdn") or raw.get("avatar_large") or raw.get("avatar")),
        created_at=fetched_at,
        fetched_at=fetched_at,
    )


__all__ = ["FreelancerClient", "UpstreamBatch", "UpstreamError", "create_http_client", "parse_user"]
