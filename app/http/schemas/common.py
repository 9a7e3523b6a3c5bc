"""What every route shares: the error body, the JSON loader, and the "one of" schema hook."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson
from pydantic import BaseModel, Field

from app.errors import InvalidRequest, UnsupportedMediaType
from app.gateway.results import Reason


class ErrorResponse(BaseModel):
    """Every error the API returns."""

    error: str = Field(examples=["invalid_request"])
    detail: str = Field(examples=["user_ids must hold at most 100 ids (got 250)"])
    reason: Reason | None = None


def one_of(*names: str) -> Callable[[dict[str, Any]], None]:
    """A schema hook saying "exactly one of `names`": `oneOf`, each alternative closed and
    holding the other fields too. The alternatives' fields are optional only in that one of
    them is given; none takes null."""

    def hook(schema: dict[str, Any]) -> None:
        properties = schema["properties"]
        for name in names:
            prop = properties[name]
            branches = [b for b in prop.pop("anyOf", []) if b.get("type") != "null"]
            prop.pop("default", None)
            if branches:
                prop.update(branches[0])
        shared = {k: v for k, v in properties.items() if k not in names}
        schema["oneOf"] = [
            {
                "type": "object",
                "properties": {name: properties[name], **shared},
                "required": [name],
                "additionalProperties": False,
            }
            for name in names
        ]

    return hook


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type value, lower case, without its parameters."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_json(content_type: str | None) -> bool:
    """`application/json`, or a `+json` type (`application/merge-patch+json`)."""
    media = media_type(content_type)
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def require_json(content_type: str | None) -> None:
    """UnsupportedMediaType unless the body is declared JSON.

    Not a formality: a web page's form or `fetch` with a `text/plain` (or no) content type
    is a "simple request" that the browser sends cross-origin without asking the server
    first, so a JSON route that parsed it anyway could be driven by any page.
    """
    if not is_json(content_type):
        shown = repr(media_type(content_type)[:60]) if content_type else "none"
        raise UnsupportedMediaType(f"send the body as application/json (Content-Type), not {shown}")


def load_json(body: bytes, *, status_code: int) -> Any:
    """The parsed body; InvalidRequest with `status_code` when it is not JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    # orjson refuses integers beyond 64 bits; the stdlib parses them so we can say
    # "too large" instead of "not JSON".
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest("the body is not valid JSON", status_code=status_code) from exc


def kind_of(value: Any) -> str:
    return {dict: "an object", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
