"""Plain ASGI layers in front of the framework: the per-request bookkeeping, the body limit, JSON
by default, and the fast paths.

The fast paths serve the hot requests, a push (`POST /v1/streams/{name}/values`) and a read
(`GET /v1/streams/{name}`), without the framework's routing, dependency injection and body
handling, which cost more CPU than the Redis call itself. They validate with the same pydantic
model as the FastAPI routes (which stay in the OpenAPI schema and serve the same requests when
the fast path is off), call the same store methods and render the state with the same function
(codec.state_json), so that both answer every request alike.
"""

import re
import time
from typing import Final

from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.codec import state_json
from app.errors import (
    InvalidInput,
    PayloadTooLarge,
    ServiceError,
    internal_error,
    service_problem,
)
from app.keys import NAME_PATTERN
from app.logs import log_request, request_id
from app.metrics import Metrics
from app.models import Push
from app.store import StreamStore

_NAME: Final = NAME_PATTERN.strip("^$")
_PUSH_PATH: Final = re.compile(f"/v1/streams/({_NAME})/values")
_STATE_PATH: Final = re.compile(f"/v1/streams/({_NAME})")
_JSON: Final = b"application/json"
_JSON_HEADERS: Final = [(b"content-type", _JSON)]
_EVENT_STREAM: Final = b"text/event-stream"


class Bookkeeping:
    """Outermost layer: what every HTTP request costs in bookkeeping, done once, through one
    wrapper of `send`: its metrics (count and duration by route template, open event streams),
    and with the access log on, its request id (echoed as X-Request-ID) and log line. Counts
    the requests the fast paths and the auth layer answer too."""

    def __init__(self, app: ASGIApp, metrics: Metrics, access_log: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = request_id(scope) if self.access_log else None
        status = 0
        streaming = False

        async def bookkept_send(message: Message) -> None:
            nonlocal status, streaming
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.request_done(scope, status, time.perf_counter() - started)
                headers = message.get("headers", ())
                for key, value in headers:
                    if key == b"content-type" and value.startswith(_EVENT_STREAM):
                        streaming = True
                        self.metrics.subscriptions.inc()
                if rid is not None:
                    message["headers"] = [*headers, (b"x-request-id", rid)]
            await send(message)

        try:
            await self.app(scope, receive, bookkept_send)
        except Exception:
            # Unhandled (the framework answers its own routes' errors, then re-raises): answer
            # as it does, if nothing was sent yet, and let the server log the traceback.
            if status == 0:
                await internal_error(scope["path"])(scope, receive, bookkept_send)
            raise
        finally:
            if status == 0:  # no response started: the client went away, or nobody listens
                self.metrics.request_done(scope, 500, time.perf_counter() - started)
            if streaming:
                self.metrics.subscriptions.dec()
            if rid is not None:
                log_request(scope, status or 500, rid, time.perf_counter() - started)


class BodyLimit:
    """Answers 413 to a body over `max_bytes`, declared or streamed, before it is all read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        streamed = False
        for header, value in scope["headers"]:
            if header == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                response = service_problem(PayloadTooLarge(self.max_bytes), scope["path"])
                await response(scope, receive, send)
                return
            streamed = streamed or header == b"transfer-encoding"
        if not streamed:
            # A body of a declared length (the server delivers no more), or none at all: there
            # is nothing to watch as it arrives.
            await self.app(scope, receive, send)
            return
        received = 0
        rejected = False

        async def limited_receive() -> Message:
            # Over the limit, answer 413 here and tell the app the client went away: whatever
            # the app then makes of its truncated body is never sent.
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                rejected = True
                response = service_problem(PayloadTooLarge(self.max_bytes), scope["path"])
                await response(scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not rejected:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)


class JsonByDefault:
    """Reads every body as JSON, whatever content type it declares (none, a form as curl -d
    sends, text/plain): the API's bodies are always JSON, and the fast paths, which never look
    at the content type, must answer as the framework does."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            declared = [v for k, v in scope["headers"] if k == b"content-type"]
            if not declared or not _is_json(declared[0]):
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*headers, *_JSON_HEADERS]}
        await self.app(scope, receive, send)


def _is_json(content_type: bytes) -> bool:
    """What FastAPI reads as JSON: application/json or application/<anything>+json."""
    mime = content_type.split(b";", 1)[0].strip().lower()
    return mime == _JSON or (mime.startswith(b"application/") and mime.endswith(b"+json"))


class FastPaths:
    """Serves pushes and reads of one stream directly; everything else, and requests for
    invalid names, go to the app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["method"] == "POST":
                if match := _PUSH_PATH.fullmatch(scope["path"]):
                    await self._push(match[1], scope, receive, send)
                    return
            elif scope["method"] == "GET" and (match := _STATE_PATH.fullmatch(scope["path"])):
                await self._get(match[1], scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _push(self, name: str, scope: Scope, receive: Receive, send: Send) -> None:
        store: StreamStore = scope["app"].state.store
        try:
            body = await _read_body(receive)
            try:
                push = Push.from_json(body)
            except ValidationError as error:
                raise InvalidInput.from_validation(error.errors()) from None
            idempotency_key = _header(scope, b"idempotency-key")
            state, replayed = await store.push_state(name, push.samples(), idempotency_key)
        except ServiceError as error:
            await service_problem(error, scope["path"])(scope, receive, send)
            return
        extra = [(b"idempotent-replayed", b"true")] if replayed else []
        await _send_json(send, state, extra)

    async def _get(self, name: str, scope: Scope, receive: Receive, send: Send) -> None:
        store: StreamStore = scope["app"].state.store
        try:
            fields, now = await store.read(name)
        except ServiceError as error:
            await service_problem(error, scope["path"])(scope, receive, send)
            return
        await _send_json(send, state_json(name, fields, now), [])


async def _send_json(send: Send, body: bytes, extra: list[tuple[bytes, bytes]]) -> None:
    headers = [
        (b"content-length", str(len(body)).encode()),
        (b"content-type", _JSON),
        *extra,
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidInput("client disconnected before sending the whole body")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
