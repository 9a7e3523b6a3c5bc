"""What `/openapi.json` adds to FastAPI's schema: the id limit, key schemes, access errors."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.http.schemas.users import users_request_schema

ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorResponse"}
SECURITY_SCHEMES = {
    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "Bearer": {"type": "http", "scheme": "bearer", "description": "the same API key"},
}
ACCESS_ERRORS = {
    "401": "No API key was sent",
    "403": "An unknown key, or a key whose role is below the call's",
}
OPEN_MODE_REFUSAL = (
    "Without API keys: a request whose Host is not this machine (nor in ALLOWED_HOSTS), "
    "or one a page from another origin sent"
)
RATE_HEADERS = {
    name: {"schema": {"type": "string"}, "description": description}
    for name, description in (
        ("Retry-After", "Seconds until the client may call again"),
        ("RateLimit-Policy", "The client's limits (IETF httpapi RateLimit headers draft)"),
        ("RateLimit", "The limit that was hit, what is left of it and when it resets"),
    )
}


CALLBACKS_OFF = {
    "type": "null",
    "description": "Callbacks are off on this gateway: WEBHOOK_SECRET, which signs them, is "
    "not set.",
}


def customize_openapi(
    app: FastAPI,
    *,
    max_ids: int,
    keys_on: bool,
    callbacks_on: bool = True,
    job_max_ids: int | None = None,
) -> None:
    """Make the schema say MAX_USERS_PER_REQUEST, (with keys) how to send one, and (without
    WEBHOOK_SECRET) that a job takes no callback."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        schema["paths"]["/api/users"]["post"]["requestBody"] = users_request_schema(max_ids)
        submit = schema["paths"]["/api/jobs"]["post"]
        if not callbacks_on:
            _no_callbacks(submit)
        if job_max_ids is not None:
            body = submit["requestBody"]["content"]["application/json"]["schema"]
            for holder in (body, *body.get("oneOf", [])):
                listed = holder.get("properties", {}).get("user_ids")
                if listed is not None and listed.get("type") == "array":
                    listed["maxItems"] = job_max_ids
        for path, operations in schema["paths"].items():
            if not path.startswith("/api/"):
                continue
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses["429"] = {
                    "description": "The client is past one of its limits a minute",
                    "headers": RATE_HEADERS,
                    "content": {"application/json": {"schema": ERROR_SCHEMA}},
                }
                if keys_on:
                    operation["security"] = [{"ApiKey": []}, {"Bearer": []}]
                errors = ACCESS_ERRORS if keys_on else {"403": OPEN_MODE_REFUSAL}
                for code, description in errors.items():
                    responses[code] = {
                        "description": description,
                        "content": {"application/json": {"schema": ERROR_SCHEMA}},
                    }
        if keys_on:
            schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _no_callbacks(operation: dict[str, Any]) -> None:
    """A submission's `callback_url` can only be null, and its query parameter is gone."""
    operation["parameters"] = [
        p for p in operation.get("parameters", []) if p.get("name") != "callback_url"
    ]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    for holder in (body, *body.get("oneOf", [])):
        if "callback_url" in holder.get("properties", {}):
            holder["properties"]["callback_url"] = CALLBACKS_OFF
