"""Where the exception tree becomes HTTP: one JSON body per error, never a traceback.

`GatewayError`s answer with their own status code and body (`app.errors` draws the tree);
FastAPI's validation errors become 422 in the same shape, routing's 404/405/413/415 too,
and anything unexpected a logged 500 with no detail.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match

from app.errors import GatewayError

log = logging.getLogger("app")

CLIENT_CLOSED = 499
"""The status of a request whose client left before it was read whole (nginx's 499): no
answer can reach it, and it is no error of the gateway's, so it is neither logged as one
nor counted as a 500 in the metrics an operator alerts on."""

HTTP_ERROR_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_response(exc: GatewayError) -> Response:
    """The JSON response of a GatewayError: the app's handler and this middleware use it."""
    headers = exc.headers()
    if exc.retry_after:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return Response(
        orjson.dumps(exc.body()),
        status_code=exc.status_code,
        media_type="application/json",
        headers=headers,
    )


def internal_error_response() -> Response:
    """The 500 of anything unexpected: no detail, never a traceback (the log has it)."""
    return _json_error(500, {"error": "internal_error", "detail": "internal error; see the log"})


def _json_error(
    status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
    )


def install_error_handlers(app: FastAPI) -> None:
    """The one place errors become HTTP responses: JSON bodies, never a traceback."""

    async def gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return error_response(exc)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        problems = []
        for error in exc.errors()[:5]:
            loc = list(error.get("loc", ()))
            if loc and loc[0] in ("body", "path", "query", "header", "cookie"):
                loc = loc[1:]
            where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
            where = where.removeprefix(".")
            kind, msg = error.get("type"), str(error.get("msg", "invalid"))
            # Our validators' messages in our words: not pydantic's "Value error, ...".
            for prefix in ("Value error, ", "Assertion failed, "):
                msg = msg.removeprefix(prefix)
            if kind == "extra_forbidden":
                problems.append(f"unknown field {orjson.dumps(where).decode()}")
            elif kind == "json_invalid":
                problems.append("the body is not valid JSON")
            elif kind in ("model_attributes_type", "dict_type", "model_type") and not where:
                problems.append("the body must be a JSON object")
            elif kind == "missing" and not where:
                problems.append("a JSON body is required")
            else:
                problems.append(f"{where}: {msg}" if where else msg)
        return _json_error(422, {"error": "invalid_request", "detail": "; ".join(problems)})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = HTTP_ERROR_CODES.get(exc.status_code, "http_error")
        body = {"error": code, "detail": str(exc.detail)}
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return _json_error(exc.status_code, body, headers=headers)

    async def client_left(request: Request, exc: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED)

    async def unexpected_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return internal_error_response()

    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ClientDisconnect, client_left)
    app.add_exception_handler(Exception, unexpected_error)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette names only the first route's)."""
    methods: set[str] = set()
    for route in _leaf_routes(request.app.routes):
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def _leaf_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    # FastAPI 0.160+ keeps an included router as one route wrapping the router's own.
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _leaf_routes(inner.routes)
        else:
            yield route
