"""The gateway's exceptions, and the status code and JSON body each maps to.

    ConfigError                     a setting is wrong: the service does not start
    GatewayError
    ├── InvalidRequest         400/422  the client sent something we cannot serve
    ├── Unauthorized           401      no API key was sent (with WWW-Authenticate)
    ├── Forbidden              403      an unknown key, or a role below the call's
    ├── PayloadTooLarge        413      the body is over MAX_BODY_BYTES
    ├── TooManyRequests        429      a client limit was hit; retry after `retry_after` s
    ├── UserNotFound           404      Freelancer says there is no such user
    ├── Overloaded             503      a bound was hit; retry after `retry_after` s
    ├── ShuttingDown           503      the process is draining
    ├── StoreUnavailable       503      the store could not be read or written
    ├── UserUnavailable        503/504  one id could not be fetched (single-user endpoint)
    └── UpstreamError                   a call to Freelancer failed (never reaches a client)
        ├── UpstreamTimeout
        ├── UpstreamConnectError
        ├── UpstreamServerError         5xx
        ├── UpstreamBadResponse         malformed JSON or an unexpected shape
        ├── UpstreamRateLimited         429, with `retry_after`
        ├── UpstreamAuthError           401/403: credentials, not retried
        ├── UpstreamRejected            another 4xx: not retried
        └── UpstreamCircuitOpen         the breaker is open: no call was made

This module knows status codes but not FastAPI: `app.main` installs the one handler that
turns any `GatewayError` into a response with `status_code` and `body()`.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        """The JSON error body: `{"error": code, "detail": message}`."""
        return {"error": self.code, "detail": self.message}

    def headers(self) -> dict[str, str]:
        """Response headers this error adds (Retry-After is added from `retry_after`)."""
        return {}


class ConfigError(Exception):
    """A setting is wrong; the message names it. Raised before the service starts."""


class InvalidRequest(GatewayError):
    status_code = 422
    code = "invalid_request"

    def __init__(self, message: str, *, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


class Unauthorized(GatewayError):
    status_code = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'ApiKey header="X-API-Key", Bearer realm="gateway"'}


class Forbidden(GatewayError):
    status_code = 403
    code = "forbidden"


class PayloadTooLarge(GatewayError):
    status_code = 413
    code = "payload_too_large"

    def headers(self) -> dict[str, str]:
        # The rest of the body is not read: the connection cannot be reused.
        return {"Connection": "close"}


class TooManyRequests(GatewayError):
    """A client limit was hit; `limit_headers` are the IETF RateLimit headers."""

    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float, limit_headers: dict[str, str]) -> None:
        super().__init__(message, retry_after=retry_after)
        self.limit_headers = limit_headers

    def headers(self) -> dict[str, str]:
        return self.limit_headers


class UserNotFound(GatewayError):
    status_code = 404
    code = "not_found"


class JobNotFound(GatewayError):
    status_code = 404
    code = "not_found"


class JobConflict(GatewayError):
    """The action does not fit the job's state (retry a running job, cancel a finished one)."""

    status_code = 409
    code = "conflict"


class UnsupportedMediaType(GatewayError):
    status_code = 415
    code = "unsupported_media_type"


class Overloaded(GatewayError):
    status_code = 503
    code = "overloaded"


class ShuttingDown(GatewayError):
    status_code = 503
    code = "shutting_down"


class StoreUnavailable(GatewayError):
    status_code = 503
    code = "store_unavailable"


class UserUnavailable(GatewayError):
    """One id could not be answered: 504 when it timed out, 503 when upstream is failing."""

    code = "unavailable"

    def __init__(self, message: str, *, reason: str, status_code: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.status_code = status_code

    def body(self) -> dict[str, Any]:
        return {**super().body(), "reason": self.reason}


class UpstreamError(GatewayError):
    """A call to Freelancer failed. `retryable` says whether trying again can help."""

    status_code = 502
    code = "upstream_error"
    retryable = True
    reason = "upstream_error"


class UpstreamTimeout(UpstreamError):
    reason = "timeout"


class UpstreamConnectError(UpstreamError):
    pass


class UpstreamServerError(UpstreamError):
    pass


class UpstreamBadResponse(UpstreamError):
    pass


class UpstreamRateLimited(UpstreamError):
    reason = "rate_limited"


class UpstreamAuthError(UpstreamError):
    retryable = False
    reason = "auth"


class UpstreamRejected(UpstreamError):
    """Freelancer refused the request itself (a 4xx other than 401/403/429)."""

    retryable = False
    status: int = 400


class UpstreamCircuitOpen(UpstreamError):
    """The circuit breaker refused the call: Freelancer has been failing."""

    retryable = False
    reason = "breaker_open"
