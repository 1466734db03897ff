"""The OpenAPI document: FastAPI's, completed with what the framework cannot see.

The API keys are checked by an ASGI layer (app.auth), and the request limits by the HTTP
protocol (app.protocol), not by route dependencies: this adds their security scheme and error
responses. It also names each operation after its function in camelCase (`putStream`,
`pushValues`: generated clients and the docs read them), answers errors as
`application/problem+json` only (FastAPI documents a 422 of its own shape otherwise), and keeps
the document valid OpenAPI 3.1, checked by the tests with openapi-spec-validator and Redocly.
"""

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from app.auth import is_public
from app.errors import problem_response
from app.models import Problem

BEARER = "bearerKey"
QUERY_KEY = "queryKey"
_SECURITY_SCHEMES = {
    BEARER: {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key, as `Authorization: Bearer <key>`. Needed when the service "
        "is configured with keys (EMA_API_KEYS); without keys every route is open.",
    },
    QUERY_KEY: {
        "type": "apiKey",
        "in": "query",
        "name": "api_key",
        "description": "The same key as a query parameter, on GET only: for browsers' "
        "EventSource, which cannot send headers.",
    },
}
# Answered by the HTTP protocol before any route, so possible on every operation.
_CONNECTION_ERRORS = (408, 431)


def operation_id(route: APIRoute) -> str:
    """`put_stream` -> `putStream`."""
    first, *rest = route.name.split("_")
    return first + "".join(part.capitalize() for part in rest)


def install(app: FastAPI) -> None:
    """Serve the completed document at /openapi.json (built once, on first request)."""

    keys = bool(app.state.settings.api_keys)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(FastAPI.openapi(app), keys_required=keys)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def complete(document: dict[str, Any], *, keys_required: bool) -> dict[str, Any]:
    """The document completed. Without keys configured the service is open: a key is then
    optional (an empty security requirement) and no route answers 401 or 403."""
    document["info"]["license"] = {"name": "MIT", "identifier": "MIT"}
    document.setdefault("servers", [{"url": "/", "description": "This service"}])
    components = document.setdefault("components", {})
    components["securitySchemes"] = _SECURITY_SCHEMES
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            _complete_operation(path, method, operation, keys_required)
    schemas = components.setdefault("schemas", {})
    schemas.setdefault("Problem", Problem.model_json_schema())
    # FastAPI's own 422 body, replaced by the problem above.
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return document


def _complete_operation(
    path: str, method: str, operation: dict[str, Any], keys_required: bool
) -> None:
    responses: dict[str, Any] = operation["responses"]
    if is_public(path):
        operation["security"] = []
    else:
        operation["security"] = [{BEARER: []}, *([{QUERY_KEY: []}] if method == "get" else [])]
        if keys_required:
            for refused in (401, 403):
                responses.setdefault(str(refused), problem_response(refused))
        else:
            operation["security"].append({})
    for refused in _CONNECTION_ERRORS:
        responses.setdefault(str(refused), problem_response(refused))
    for status, response in responses.items():
        if status.startswith(("4", "5")):
            # Only problem+json: FastAPI would put the schema under application/json.
            response["content"] = problem_response(int(status))["content"]
    operation["responses"] = dict(sorted(responses.items()))
