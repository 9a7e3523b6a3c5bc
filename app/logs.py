"""The gateway's log lines: text or one JSON object a line, each with its request id.

`request_id` is a context variable the middleware sets per request; the worker sets it
to the ids of the requests a batch serves. Nothing logs headers or bodies, and every
line passes `redact`, which masks credentials in URLs (a MongoDB password in an error
message, say). The values of the secret settings are masked by a `SecretMask` the
lifespan puts on the root logger's handlers while the app runs (`masking`), and takes
off when it stops: no list of secrets outlives the app that knew them.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

import orjson

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

# Everything between `scheme://` and the last `@` before the path: an empty user name
# (`redis://:pw@`), and a password holding an `@` its writer did not encode, included.
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s]*@")

# Fields a record may carry through `extra=` that the JSON line shows by name.
_EXTRA = ("method", "route", "status", "duration_ms", "key", "action", "size", "batch")


def redact(text: str) -> str:
    """The text with URL credentials masked."""
    return _URL_CREDENTIALS.sub(r"\1***@", text)


class SecretMask(logging.Filter):
    """Masks secret values (tokens, passwords) in a record: its message and its traceback.

    A handler's filter sees every record the handler writes, whichever logger made it
    (a driver's error message quoting a URL, say), before any formatter renders it.
    """

    def __init__(self, values: Iterable[str | None]) -> None:
        super().__init__()
        # Short values would mask ordinary words; settings this short are not secrets.
        self.values = sorted({v for v in values if v and len(v) >= 6}, key=len, reverse=True)

    def mask(self, text: str) -> str:
        for value in self.values:
            text = text.replace(value, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.values:
            message = record.getMessage()
            masked = self.mask(message)
            if masked != message:
                record.msg, record.args = masked, None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self.mask(record.exc_text)
        return True


@contextmanager
def masking(values: Iterable[str | None]) -> Iterator[None]:
    """While the context lasts, mask `values` in every line the root logger's handlers write."""
    mask = SecretMask(values)
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(mask)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(mask)


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
            text = record.exc_text or self.formatException(record.exc_info)
            line["exc"] = redact(text)
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
