"""uvicorn's HTTP/1.1 protocol (httptools) with the limits it does not have, the size of a
request's head and the time a client may take to send a request, and one write per response.

Without the limits a client can make a worker hold a 100 MB header in memory, or keep hundreds of
connections open by sending a byte a second (slowloris), or declare a body and never send it.
`python -m app` serves with this protocol; `uvicorn --http app.protocol:BoundedHttpProtocol`
does too.

- A request line and headers over EMA_MAX_HEADER_BYTES: 431, and the connection is closed.
- A request (head and body) not received within EMA_REQUEST_TIMEOUT seconds of its first byte
  (or of the connection, for its first request): 408, and the connection is closed; a new
  connection that sent nothing in that time is closed without an answer. An idle keep-alive
  connection is closed after uvicorn's keep-alive timeout (5 s).
- What a connection's responses write in one event-loop turn leaves in one send: uvicorn
  writes a head and its body apart, and each send costs a system call and a wake-up of the
  client (measured: 10% of a push's CPU).
- A GET request's scope offers the ASGI extension `ema.write_now` (read with `write_now_of`):
  the event hub writes a batch of updates to each waiting subscriber's response at once,
  rather than wake a task per subscriber to `send` it.
"""

import asyncio
import json
from collections.abc import Callable
from functools import cache
from http import HTTPStatus
from typing import Any

from starlette.types import Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from app.errors import PROBLEM_JSON
from app.settings import Settings


@cache
def _limits() -> tuple[int, float]:
    # Read once per process, on its first connection: the protocol is built by uvicorn,
    # which has no way to hand it the app's settings.
    settings = Settings()
    return settings.max_header_bytes, settings.request_timeout


def _problem(status: HTTPStatus, detail: str) -> bytes:
    body = json.dumps(
        {"type": "about:blank", "title": status.phrase, "status": int(status), "detail": detail}
    ).encode()
    head = (
        f"HTTP/1.1 {int(status)} {status.phrase}\r\n"
        f"content-type: {PROBLEM_JSON}\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class _TurnWrites:
    """The connection's transport, with what is written in one event-loop turn sent in one
    write: uvicorn writes a response's head and body separately, two sends where one does (a
    small response costs a send, not a copy). Closing sends what is held first."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)

    def flush(self) -> None:
        if self._held:
            data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
            self._held.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


WriteNow = Callable[[bytes], bool]
"""The `ema.write_now` extension's "write": writes `body` as the next chunk of a started
chunked response without awaiting, and says so; False (nothing written) once the response is
complete or the client gone, or while the transport is over its high-water mark: the caller
then goes through the ASGI `send`, which waits for the transport to drain."""


def _write_now(cycle: RequestResponseCycle) -> WriteNow:
    def write_now(body: bytes) -> bool:
        if (
            cycle.disconnected
            or cycle.response_complete
            or not cycle.chunked_encoding  # also None: the response has not started
            or cycle.flow.write_paused
        ):
            return False
        # As uvicorn frames a chunk (RequestResponseCycle.send).
        cycle.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
        return True

    return write_now


class BoundedHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with a bound on the request head's size and on a request's time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_head, self._timeout = _limits()
        self._head_bytes = 0
        self._in_head = True  # until the current request's headers are complete
        self._deadline: asyncio.TimerHandle | None = None
        self._refused = False  # answered and closing: nothing more is parsed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _TurnWrites(transport, self.loop)  # type: ignore[assignment]
        self._arm()  # a connection that sends nothing is a slow client too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Checked as the head arrives, so that an endless header is never held whole.
        if self._in_head and self._head_bytes > self._max_head:
            self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, self._too_large())

    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        if self._deadline is None:  # a keep-alive connection's next request
            self._arm()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self._max_head:
            self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, self._too_large())
            return
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope and self.scope["method"] == "GET":
            extension: dict[object, object] = {"write": _write_now(cycle)}
            self.scope.setdefault("extensions", {})["ema.write_now"] = extension

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        self._in_head, self._head_bytes = True, 0  # what follows is the next request's head
        super().on_message_complete()

    def _too_large(self) -> str:
        return f"the request line and headers exceed {self._max_head} bytes"

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self._timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self._in_head and self._head_bytes == 0:
            # Nothing sent yet: no request to answer. A client that opened a connection in
            # advance would otherwise read this 408 as the answer to its next request.
            self._refused = True
            self.transport.close()
            return
        detail = f"the request was not received within {self._timeout:g} seconds"
        self._refuse(HTTPStatus.REQUEST_TIMEOUT, detail)

    def _refuse(self, status: HTTPStatus, detail: str) -> None:
        """Answer `status` unless a response has started, and close the connection."""
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self._disarm()
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            if cycle is not None and not cycle.response_complete:
                # The app waiting for the body is told the client left: it answers no one.
                cycle.disconnected = True
                cycle.message_event.set()
            self.transport.write(_problem(status, detail))
        self.transport.close()


def write_now_of(scope: Scope) -> WriteNow | None:
    """The `ema.write_now` extension's writer, if the server offers it (see WriteNow)."""
    extension = scope.get("extensions", {}).get("ema.write_now")
    return None if extension is None else extension["write"]
