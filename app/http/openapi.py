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


def customize_openapi(app: FastAPI, *, max_ids: int, keys_on: bool) -> None:
    """Make the schema say MAX_USERS_PER_REQUEST, and (with keys) how to send one."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        schema["paths"]["/api/users"]["post"]["requestBody"] = users_request_schema(max_ids)
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
