"""Errors, and the one place they become HTTP responses.

ServiceError                 a failure the client is told about, as problem+json
├── StreamNotFound           404
├── PayloadTooLarge          413
├── LateSample               409 (a stream that rejects late samples got one)
├── InvalidInput             422 (also every request validation error)
└── StoreUnavailable         503 with Retry-After: Redis is down, slow or failing over
"""

import json
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

PROBLEM_JSON = "application/problem+json"


class ServiceError(Exception):
    status = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, detail: str, *, errors: Sequence[Mapping[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors

    def headers(self) -> dict[str, str]:
        return {}


class StreamNotFound(ServiceError):
    status = HTTPStatus.NOT_FOUND

    def __init__(self, name: str) -> None:
        super().__init__(f"stream {name!r} does not exist")


class PayloadTooLarge(ServiceError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds {limit} bytes")


class InvalidInput(ServiceError):
    status = HTTPStatus.UNPROCESSABLE_ENTITY

    @classmethod
    def from_validation(cls, errors: Sequence[Mapping[str, Any]]) -> "InvalidInput":
        # The offending input is left out: it may be huge, and it is the client's own.
        listed = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors[:20]]
        first = listed[0] if listed else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"])
        detail = f"{where}: {first['msg']}" if where else str(first["msg"])
        if len(errors) > 1:
            detail += f" (and {len(errors) - 1} more)"
        return cls(detail, errors=listed)


class LateSample(ServiceError):
    """A sample older than the stream's newest, on a stream that rejects late samples."""

    status = HTTPStatus.CONFLICT


class StoreUnavailable(ServiceError):
    status = HTTPStatus.SERVICE_UNAVAILABLE

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


def problem(
    status: int,
    detail: str,
    *,
    instance: str | None = None,
    errors: Sequence[Mapping[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    if errors:
        body["errors"] = errors
    return Response(json.dumps(body), status, headers=headers, media_type=PROBLEM_JSON)


def service_problem(error: ServiceError, path: str | None) -> Response:
    return problem(
        error.status, error.detail, instance=path, errors=error.errors, headers=error.headers()
    )


async def _service_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, ServiceError)
    return service_problem(error, request.url.path)


async def _request_invalid(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError | ValidationError)
    return service_problem(InvalidInput.from_validation(error.errors()), request.url.path)


_TOO_DEEP = {"loc": ["body"], "msg": "JSON nested too deeply", "type": "json_invalid"}


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    if isinstance(error.__cause__, RecursionError):
        # FastAPI answers 400 to a body its JSON parser gave up on (thousands of nested `[`):
        # it is malformed input like any other, a 422.
        invalid = InvalidInput("body: JSON nested too deeply", errors=[_TOO_DEEP])
        return service_problem(invalid, request.url.path)
    return problem(
        error.status_code, str(error.detail), instance=request.url.path, headers=error.headers
    )


def internal_error(path: str | None) -> Response:
    """The 500 of an exception nothing handled (the server logs its traceback)."""
    return problem(500, "internal error; it has been logged", instance=path)


async def _unexpected(request: Request, error: Exception) -> Response:
    return internal_error(request.url.path)


# What each error status means, as the OpenAPI document says it.
PROBLEM_DESCRIPTIONS: dict[int, str] = {
    401: "An API key is required (the service has keys configured) and none valid was given; "
    "comes with `WWW-Authenticate: Bearer`.",
    403: "The API key does not allow this scope or stream.",
    404: "The stream does not exist.",
    408: "The request (head and body) did not arrive within EMA_REQUEST_TIMEOUT seconds; the "
    "connection is closed.",
    409: "A sample older than the stream's newest, on a stream that rejects late samples "
    "(`late: reject`); nothing was applied.",
    413: "The body is over EMA_MAX_BODY_BYTES.",
    422: "Invalid input; `errors` says where. Nothing was changed.",
    431: "The request line and headers are over EMA_MAX_HEADER_BYTES; the connection is closed.",
    503: "Redis is unavailable, too slow, loading or failing over (or, for an event stream, "
    "this process serves its maximum of subscriptions); comes with `Retry-After`.",
}


def problem_response(status: int) -> dict[str, Any]:
    """The OpenAPI response object of an error: a problem+json body."""
    return {
        "description": PROBLEM_DESCRIPTIONS[status],
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for a route that can fail with these statuses (and 503, always)."""
    return {status: problem_response(status) for status in (*statuses, 503)}


def install(app: FastAPI) -> None:
    """Render every error the app can raise as application/problem+json."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _request_invalid)
    app.add_exception_handler(ValidationError, _request_invalid)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
