"""Plain ASGI layers in front of the framework: the body limit, JSON by default, and the push
fast path.

The fast path serves `POST /v1/streams/{name}/values` without the framework's routing,
dependency injection and body handling, which cost more CPU than the Redis call itself. It
validates with the same pydantic model as the FastAPI route (which stays in the OpenAPI schema
and serves the same requests when the fast path is off) and calls the same store.
"""

import re
from typing import Final

from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import InvalidInput, PayloadTooLarge, ServiceError, service_problem
from app.keys import NAME_PATTERN
from app.models import Push
from app.store import StreamStore

_PUSH_PATH: Final = re.compile("/v1/streams/(" + NAME_PATTERN.strip("^$") + ")/values")
_JSON_HEADERS: Final = [(b"content-type", b"application/json")]
_REPLAYED_HEADERS: Final = [*_JSON_HEADERS, (b"idempotent-replayed", b"true")]
# curl -d sends this content type; the API's bodies are always JSON.
_FORM: Final = b"application/x-www-form-urlencoded"


class BodyLimit:
    """Answers 413 to a body over `max_bytes`, declared or streamed, before it is all read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for header, value in scope["headers"]:
            if header == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                response = service_problem(PayloadTooLarge(self.max_bytes), scope["path"])
                await response(scope, receive, send)
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
    """Treats a body sent without a content type, or as a form (curl -d), as JSON."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            declared = [v for k, v in scope["headers"] if k == b"content-type"]
            if not declared or declared[0].startswith(_FORM):
                scope = {**scope, "headers": [*headers, *_JSON_HEADERS]}
        await self.app(scope, receive, send)


class PushFastPath:
    """Serves pushes directly; everything else, and pushes to invalid names, go to the app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = (
            _PUSH_PATH.fullmatch(scope["path"])
            if scope["type"] == "http" and scope["method"] == "POST"
            else None
        )
        if match is None:
            await self.app(scope, receive, send)
            return
        store: StreamStore = scope["app"].state.store
        try:
            body = await _read_body(receive)
            try:
                push = Push.model_validate_json(body)
            except ValidationError as error:
                raise InvalidInput.from_validation(error.errors()) from None
            idempotency_key = _header(scope, b"idempotency-key")
            state, replayed = await store.push(match[1], push.samples(), idempotency_key)
        except ServiceError as error:
            await service_problem(error, scope["path"])(scope, receive, send)
            return
        headers = _REPLAYED_HEADERS if replayed else _JSON_HEADERS
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": state.model_dump_json().encode()})


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
