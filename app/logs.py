"""The gateway's log lines: text or one JSON object a line, each with its request id.

`request_id` is a context variable the middleware sets per request; the worker sets it
to the ids of the requests a batch serves. Nothing logs headers or bodies, and every
line passes `redact`, which masks credentials in URLs (a MongoDB password in an error
message, say) and the values of the known secret settings.
"""

from __future__ import annotations

import logging
import re
import time
from contextvars import ContextVar
from typing import Any, Literal

import orjson

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@]+(:[^/\s@]*)?@")
_SECRETS: list[str] = []

# Fields a record may carry through `extra=` that the JSON line shows by name.
_EXTRA = ("method", "route", "status", "duration_ms", "key", "action", "size", "batch")


def redact(text: str) -> str:
    """The text with URL credentials and known secret values masked."""
    text = _URL_CREDENTIALS.sub(r"\1***@", text)
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    return text


def add_secrets(*values: str | None) -> None:
    """Values that must never appear in a log line (tokens, keys, passwords)."""
    _SECRETS.extend(v for v in values if v and len(v) >= 6 and v not in _SECRETS)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class TextFormatter(logging.Formatter):
    """`time level logger [request id]: message`, redacted."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s%(rid)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        record.rid = f" [{rid}]" if rid else ""
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, msg, request_id, and the known extras."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage()),
            "request_id": getattr(record, "request_id", None),
        }
        for name in _EXTRA:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(line).decode()


def configure_logging(level: str, *, force: bool, fmt: Literal["text", "json"] = "text") -> None:
    """Log to stderr at `level` in `fmt`; `force` replaces handlers someone else installed."""
    root = logging.getLogger()
    if root.handlers and not force:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RequestIdFilter())
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("app").setLevel(level)
    # httpx logs every request at INFO: the gateway logs its batches itself.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # uvicorn's own loggers go through the root handler, in the same format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
