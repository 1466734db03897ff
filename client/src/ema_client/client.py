"""A typed Python client for the EMA service, on httpx: `Client` (sync) and `AsyncClient`.

    from ema_client import Client

    with Client("http://127.0.0.1:8000") as ema:
        ema.create("train.loss", decay=0.99, initial=0)
        state = ema.push("train.loss", 0.73, num_updates=step, idempotent=True)
        print(state.value)

Both clients make the same calls with the same arguments and results; requests are built and
responses parsed by one shared set of functions, so the two differ only in how they wait. Each
client owns one httpx connection pool, reused by every call until it is closed.

Retries. GET, PUT, DELETE and the listing are idempotent: repeating one leaves the service as
one call would, so they are retried after a dropped connection, a timeout, a 429, 502, 503 or
504, with exponential backoff and jitter, honouring Retry-After. A push is retried only when it
carries an `Idempotency-Key` (`idempotent=True`, or your own `idempotency_key=`): the service
then applies the key's first request once and answers any repeat with the original result.
An unkeyed push is never retried, because a push whose reply was lost (a dropped connection,
a timeout, or a 503 for a Redis call that timed out) may already have been applied, and
applying it again would move the average twice. Such a failure is raised with
`maybe_applied` set; the caller decides. Bulk pushes are never retried, for the same reason.

Errors, all carrying the service's problem+json details when it sent them:

EmaError                     anything this module raises
├── ConfigurationError       a bad URL or API key: nothing was sent, nothing is retried
├── TransportError           no answer: the service is unreachable, or the connection dropped
├── ProtocolError            an answer this client does not understand
├── NotSupported             the service has no such endpoint (an older version)
└── ApiError                 an error status; `.problem`, `.status`, `.detail`, `.errors`
    ├── Unauthorized         401: no API key, or not a valid one
    ├── Forbidden            403: the key's scope does not cover this stream or operation
    ├── NotFound             404: no such stream
    ├── Conflict             409: e.g. an idempotency key reused for a different push
    ├── PayloadTooLarge      413
    ├── InvalidInput         422: `.errors` lists where and what
    ├── RateLimited          429: `.retry_after`
    └── ServiceUnavailable   503: Redis is unreachable or slow; `.retry_after`
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Final, Generic, Self, TypeVar
from urllib.parse import quote

import anyio
import httpx

from ema_client._reply import InvalidReply, Reply
from ema_client._version import __version__

DEFAULT_URL: Final = "http://127.0.0.1:8000"
URL_VARIABLE: Final = "EMA_URL"
API_KEY_VARIABLE: Final = "EMA_API_KEY"
EVENTS_PATH: Final = "/v1/streams/{name}/events"
BULK_PATH: Final = "/v1/values"

T = TypeVar("T")
M = TypeVar("M", bound=Reply)


# --- errors -----------------------------------------------------------------------------------


class EmaError(Exception):
    """Base of every error this client raises."""


class ConfigurationError(EmaError, ValueError):
    """The client's own settings are unusable (a URL that is not http(s)://host[:port], an API
    key that cannot go in a header): no request was sent, and retrying cannot help."""


class TransportError(EmaError):
    """The service gave no answer: it could not be reached, or the connection dropped.

    `maybe_applied` is true when the request may have reached the service and been applied
    (an unkeyed push, which is never retried, whose reply was lost).
    """

    def __init__(self, message: str, *, maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


class ProtocolError(EmaError):
    """The service answered with something this client cannot read."""


class NotSupported(EmaError):
    """The service does not have this endpoint (it predates the feature)."""


class ApiError(EmaError):
    """The service answered with an error status; `problem` is its problem+json body."""

    def __init__(self, problem: Problem, *, retry_after: float | None = None) -> None:
        super().__init__(f"{problem.status} {problem.title}: {problem.detail}")
        self.problem = problem
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return self.problem.status

    @property
    def detail(self) -> str:
        return self.problem.detail

    @property
    def errors(self) -> list[dict[str, Any]] | None:
        return self.problem.errors


class Unauthorized(ApiError):
    """401: the request had no API key, or not a valid one."""


class Forbidden(ApiError):
    """403: the API key's scope does not cover this stream or operation."""


class NotFound(ApiError):
    """404: the stream (or route) does not exist."""


class Conflict(ApiError):
    """409: the request conflicts with the stream's state, e.g. a reused idempotency key."""


class PayloadTooLarge(ApiError):
    """413: the body is over the service's limit."""


class InvalidInput(ApiError):
    """422: the service rejected the input; `errors` lists where and what."""


class RateLimited(ApiError):
    """429: too many requests; `retry_after` says when to come back."""


class ServiceUnavailable(ApiError):
    """503: the service cannot reach Redis in time; `retry_after` says when to come back."""


_ERRORS: Final[dict[int, type[ApiError]]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: InvalidInput,
    429: RateLimited,
    503: ServiceUnavailable,
}


def error_for(response: httpx.Response) -> ApiError:
    """The typed error for an error response (its body already read), from its problem+json;
    a body that is not one (a proxy's HTML page) is summarised instead."""
    try:
        problem = Problem.parse_json(response.content)
    except InvalidReply:
        text = " ".join(response.text.split())[:200]
        problem = Problem(
            title=response.reason_phrase or "Error",
            status=response.status_code,
            detail=text or response.reason_phrase or f"HTTP {response.status_code}",
        )
    kind = _ERRORS.get(response.status_code, ApiError)
    return kind(problem, retry_after=_retry_after(response))


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        return None  # absent, or an HTTP date: the backoff applies
    return seconds if seconds >= 0 else None


# --- results ----------------------------------------------------------------------------------


# The replies' models mirror the service's app.models (a test keeps them in step) rather than
# import it: this package installs without the service, and a reply from a newer service, with
# fields this client does not know, must still parse. They keep such fields (in `extra`, and
# as attributes). They are frozen dataclasses: see ema_client._reply.


class _Reply(Reply):
    pass


class Problem(_Reply):
    """An error's details, as the service sends them (RFC 9457 problem+json)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class StreamConfig(_Reply):
    """A stream's configuration."""

    decay: float | None = None
    halflife: float | None = None
    kind: str = "mean"
    initial: float | None = None
    auto_num_updates: bool = False
    windows: list[dict[str, Any]] | None = None
    late: str = "merge"
    ttl: int | None = None
    history: int = 0
    arithmetic: str = "float64"


class State(_Reply):
    """A stream's state and configuration, as returned by a push and by `get`: `value` is the
    moving average, `debiased` the bias-corrected one, `count` the updates applied; `variance`
    and `std` the exponentially weighted spread of the values, `z` the last value's z-score
    against the mean and std before it (each None where undefined)."""

    name: str
    value: float | None
    debiased: float | None = None
    count: int
    last: float | None = None
    decay_used: float | None = None
    updated_at: float | None = None
    variance: float | None = None
    std: float | None = None
    z: float | None = None
    timestamp: float | None = None
    windows: dict[str, Any] | None = None
    config: StreamConfig


class Page(_Reply):
    """One page of stream names; follow `next_cursor` until it is None. With `states=True`,
    also each listed stream's state, in the order of `streams`, and the service's `time` they
    are as of (a rate stream's value is its rate then)."""

    streams: list[str]
    next_cursor: str | None = None
    states: list[State] | None = None
    time: float | None = None


@dataclass(frozen=True)
class Sample:
    """A value with TensorFlow's `num_updates` (the training step): the decay used is
    min(decay, (1 + num_updates) / (10 + num_updates)); and when it was taken (Unix seconds;
    absent: the server's time), which halflife streams weigh by."""

    value: float
    num_updates: int | None = None
    timestamp: float | None = None

    def body(self) -> float | dict[str, float | int]:
        if self.num_updates is None and self.timestamp is None:
            return self.value
        body: dict[str, float | int] = {"value": self.value}
        if self.num_updates is not None:
            body["num_updates"] = self.num_updates
        if self.timestamp is not None:
            body["timestamp"] = self.timestamp
        return body


# A value to push: a number, or a Sample carrying TensorFlow's step.
Value = float | Sample


@dataclass(frozen=True)
class BulkResult:
    """The outcome of one entry of a bulk push: its new `state`, or the `error` it got."""

    stream: str
    state: State | None = None
    error: Problem | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Update(_Reply):
    """A `subscribe` event: the stream was updated."""

    id: str | None = None
    name: str
    value: float | None
    last: float | None = None
    count: int
    updated_at: float | None = None
    timestamp: float | None = None
    std: float | None = None
    z: float | None = None
    # Replayed from the history after a reconnection: it carries the fields above that the
    # history keeps (`timestamp` is the sample's time), not the whole state.
    replayed: bool = False


class Lagged(_Reply):
    """A `subscribe` event: the subscriber fell behind and `missed` updates were dropped (None:
    an unknown number, e.g. after the service lost Redis for a moment)."""

    id: str | None = None
    missed: int | None


Event = Update | Lagged


@dataclass(frozen=True)
class Features:
    """What the service offers beyond the core API, read from its /openapi.json."""

    events: bool
    bulk: bool
    idempotency: bool
    api_keys: bool

    @classmethod
    def from_openapi(cls, spec: Mapping[str, Any]) -> Features:
        paths = spec.get("paths", {})
        text = json.dumps(spec).lower()
        return cls(
            events="get" in paths.get(EVENTS_PATH, {}),
            bulk="post" in paths.get(BULK_PATH, {}),
            idempotency="idempotency-key" in text,
            api_keys=bool(spec.get("components", {}).get("securitySchemes")),
        )


# --- retries ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Retry:
    """How calls that are safe to repeat are retried: `attempts` tries in all, waiting
    `backoff` seconds, doubled each time, with jitter, at most `max_delay` (also the cap on a
    server's Retry-After)."""

    attempts: int = 4
    backoff: float = 0.2
    max_delay: float = 10.0
    statuses: frozenset[int] = frozenset({429, 502, 503, 504})

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the `failures`-th consecutive failure."""
        ceiling = min(self.max_delay, self.backoff * 2 ** (failures - 1))
        wait = random.uniform(ceiling / 2, ceiling)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_delay))
        return wait


DEFAULT_RETRY: Final = Retry()
NO_RETRY: Final = Retry(attempts=1)


class _Attempts:
    """One call's retry bookkeeping: after each failure, how long to wait, or raise."""

    def __init__(self, policy: Retry, call: _Call[Any]) -> None:
        self.policy = policy
        self.call = call
        self.failures = 0

    def _may_retry(self) -> bool:
        self.failures += 1
        return self.call.retry and self.failures < self.policy.attempts

    def after_error(self, error: httpx.TransportError) -> float:
        """The wait before trying again after no answer; raises TransportError when done."""
        _raise_if_unusable(error)
        if self._may_retry():
            return self.policy.delay(self.failures)
        # A request that never got a connection carried nothing: nothing can have been applied.
        unsent = isinstance(error, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
        maybe = self.call.mutates and not self.call.retry and not unsent
        message = f"{self.call.method} {self.call.path}: {_describe(error)}"
        if maybe:
            message += " (the push may have been applied; unkeyed pushes are never retried)"
        elif self.failures > 1:
            message += f" (after {self.failures} attempts)"
        raise TransportError(message, maybe_applied=maybe) from error

    def after_response(self, response: httpx.Response) -> float | None:
        """The wait before trying again after this answer, or None to keep it."""
        if response.status_code not in self.policy.statuses or not self._may_retry():
            return None
        return self.policy.delay(self.failures, _retry_after(response))


def _raise_if_unusable(error: Exception) -> None:
    """A request httpx refused to send (an unsupported scheme, a header it cannot write) fails
    the same way every time: say so at once rather than retry it."""
    if isinstance(error, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
        raise ConfigurationError(str(error)) from error


def service_url(url: str) -> str:
    """The service's base URL: `host:port` and `host` get http://; raises ConfigurationError
    for anything but http(s)://host[:port][/path]."""
    text = url.strip()
    if "://" not in text:
        text = f"http://{text}"
    try:
        parsed = httpx.URL(text)
    except (httpx.InvalidURL, ValueError) as error:
        raise ConfigurationError(f"invalid service URL {url!r}: {error}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigurationError(
            f"invalid service URL {url!r}: give http://host:port, https://host or host:port"
        )
    return text.rstrip("/")


def _describe(error: httpx.TransportError) -> str:
    kind = {
        httpx.ConnectError: "cannot connect",
        httpx.ConnectTimeout: "timed out connecting",
        httpx.PoolTimeout: "timed out waiting for a free connection",
        httpx.ReadTimeout: "timed out waiting for the reply",
        httpx.RemoteProtocolError: "the connection dropped",
        httpx.ReadError: "the connection dropped",
        httpx.WriteError: "the connection dropped",
    }.get(type(error), "transport error")
    detail = str(error)
    return f"{kind} ({detail})" if detail else kind


# --- requests and their parsing, shared by both clients ----------------------------------------


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One API call: the request to send, whether it may be retried, and how to read the reply."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    body: Any = None
    params: dict[str, str | int] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    retry: bool = True
    mutates: bool = False

    def content(self) -> bytes | None:
        # NaN and infinities go out as JSON's NaN / Infinity: the service is the one validator
        # and answers them with a 422 that says what is wrong.
        return None if self.body is None else json.dumps(self.body).encode()

    def headers_to_send(self) -> dict[str, str]:
        if self.body is None:
            return self.headers
        return {"content-type": "application/json", **self.headers}


def _stream_path(name: str, suffix: str = "") -> str:
    return f"/v1/streams/{quote(name, safe='')}{suffix}"


def _checked(response: httpx.Response) -> httpx.Response:
    if response.is_error:
        raise error_for(response)
    return response


def _json(response: httpx.Response) -> Any:
    try:
        return _checked(response).json()
    except ValueError as error:
        raise ProtocolError(f"the service did not answer JSON: {error}") from None


def _model(kind: type[M]) -> Callable[[httpx.Response], M]:
    def parse(response: httpx.Response) -> M:
        try:
            return kind.parse(_json(response))
        except InvalidReply as error:
            raise ProtocolError(f"unexpected reply: {error}") from None

    return parse


def _nothing(response: httpx.Response) -> None:
    _checked(response)


def _values_body(values: Value | Sequence[Value]) -> dict[str, Any]:
    if isinstance(values, Sample):
        body = values.body()
        return body if isinstance(body, dict) else {"value": body}
    if isinstance(values, float | int):
        return {"value": values}
    return {"values": [item.body() if isinstance(item, Sample) else item for item in values]}


def _idempotency(idempotent: bool, key: str | None) -> dict[str, str]:
    if key is None and not idempotent:
        return {}
    return {"idempotency-key": key or str(uuid.uuid4())}


def _config(
    decay: float | None,
    halflife: float | None,
    initial: float | None,
    auto_num_updates: bool,
    config: dict[str, Any],
) -> dict[str, Any]:
    return {
        "decay": decay,
        "halflife": halflife,
        "initial": initial,
        "auto_num_updates": auto_num_updates or None,
        **config,
    }


class _Calls:
    """Every API call, built without I/O: both clients send these."""

    @staticmethod
    def create(name: str, config: dict[str, Any]) -> _Call[State]:
        body = {key: value for key, value in config.items() if value is not None}
        return _Call("PUT", _stream_path(name), _model(State), body=body, mutates=True)

    @staticmethod
    def get(name: str) -> _Call[State]:
        return _Call("GET", _stream_path(name), _model(State))

    @staticmethod
    def delete(name: str) -> _Call[None]:
        return _Call("DELETE", _stream_path(name), _nothing, mutates=True)

    @staticmethod
    def push(
        name: str, values: Value | Sequence[Value], idempotent: bool, key: str | None
    ) -> _Call[State]:
        headers = _idempotency(idempotent, key)
        return _Call(
            "POST",
            _stream_path(name, "/values"),
            _model(State),
            body=_values_body(values),
            headers=headers,
            retry=bool(headers),
            mutates=True,
        )

    @staticmethod
    def push_bulk(entries: Mapping[str, Value | Sequence[Value]]) -> _Call[list[BulkResult]]:
        streams = list(entries)
        body = {"entries": [{"stream": s, **_values_body(entries[s])} for s in streams]}

        def parse(response: httpx.Response) -> list[BulkResult]:
            if response.status_code in (404, 405):
                raise NotSupported(f"this service has no bulk endpoint (POST {BULK_PATH})")
            return _bulk_results(streams, _json(response))

        return _Call("POST", BULK_PATH, parse, body=body, retry=False, mutates=True)

    @staticmethod
    def page(prefix: str, cursor: str | None, limit: int, states: bool) -> _Call[Page]:
        params: dict[str, str | int] = {"prefix": prefix, "limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        if states:
            params["states"] = "true"
        return _Call("GET", "/v1/streams", _model(Page), params=params)

    @staticmethod
    def features() -> _Call[Features]:
        return _Call("GET", "/openapi.json", lambda r: Features.from_openapi(_json(r)))


def _bulk_results(streams: list[str], reply: Any) -> list[BulkResult]:
    """Per-entry results, in request order: each a stream state, or a problem (bare, or under
    `state` / `error`), in a list or under `results`."""
    items = reply.get("results") if isinstance(reply, dict) else reply
    if not isinstance(items, list) or len(items) != len(streams):
        raise ProtocolError("the bulk reply does not have one result per entry")
    results = []
    for stream, item in zip(streams, items, strict=True):
        try:
            if isinstance(item, dict) and isinstance(item.get("error"), dict):
                results.append(BulkResult(stream, error=Problem.parse(item["error"])))
            elif isinstance(item, dict) and isinstance(item.get("state"), dict):
                results.append(BulkResult(stream, state=State.parse(item["state"])))
            elif isinstance(item, dict) and "status" in item and "count" not in item:
                results.append(BulkResult(stream, error=Problem.parse(item)))
            else:
                state = item.get("state", item) if isinstance(item, dict) else item
                results.append(BulkResult(stream, state=State.parse(state)))
        except InvalidReply as error:
            raise ProtocolError(f"unexpected bulk result for {stream!r}: {error}") from None
    return results


# --- server-sent events -----------------------------------------------------------------------


@dataclass
class _RawEvent:
    event: str = "message"
    data: list[str] = field(default_factory=list)
    id: str | None = None


class _SseParser:
    """text/event-stream, line by line (WHATWG HTML, "Server-sent events")."""

    def __init__(self) -> None:
        self.pending = _RawEvent()
        self.retry_ms: int | None = None

    def feed(self, line: str) -> _RawEvent | None:
        """Takes one line (without its end); returns an event when a blank line ends one."""
        if not line:
            event, self.pending = self.pending, _RawEvent()
            return event if event.data else None
        if line.startswith(":"):
            return None  # a comment: the server's heartbeat
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self.pending.event = value
        elif name == "data":
            self.pending.data.append(value)
        elif name == "id" and "\0" not in value:
            self.pending.id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None


class _Resume:
    """A subscription's state across connections, shared by the sync and async ones: the last
    event id (sent back as Last-Event-ID), and the backoff between reconnections."""

    def __init__(
        self,
        name: str,
        last_event_id: str | None,
        retry: Retry,
        max_reconnects: int | None,
        timeout: httpx.Timeout,
    ) -> None:
        self.name = name
        self.timeout = timeout
        self.last_event_id = last_event_id
        self.retry = retry
        self.max_reconnects = max_reconnects
        self.failures = 0
        self.parser = _SseParser()

    def call(self) -> _Call[None]:
        headers = {"accept": "text/event-stream"}
        if self.last_event_id is not None:
            headers["last-event-id"] = self.last_event_id
        return _Call("GET", _stream_path(self.name, "/events"), _nothing, headers=headers)

    def opened(self, response: httpx.Response) -> None:
        """Checks a new connection's answer (its body read when it is an error)."""
        _checked(response)
        kind = response.headers.get("content-type", "")
        if not kind.startswith("text/event-stream"):
            raise ProtocolError(f"expected text/event-stream, got {kind or 'no content type'}")
        self.parser = _SseParser()

    def line(self, line: str) -> Event | None:
        raw = self.parser.feed(line)
        if raw is None:
            return None
        if raw.id is not None:
            self.last_event_id = raw.id
        self.failures = 0
        data = "\n".join(raw.data)
        try:
            if raw.event == "update":
                return replace(Update.parse_json(data), id=raw.id)
            if raw.event == "lagged":
                return replace(Lagged.parse_json(data), id=raw.id)
        except InvalidReply as error:
            raise ProtocolError(f"unexpected {raw.event} event: {error}") from None
        return None  # an event type newer than this client

    def dropped(self, error: Exception | None) -> float:
        """The wait before reconnecting after the connection ended (`error` None: the server
        closed it); raises when the error is final or the reconnections are used up."""
        if error is not None:
            _raise_if_unusable(error)
        if isinstance(error, ApiError) and error.status not in self.retry.statuses:
            raise error
        if isinstance(error, ProtocolError):
            raise error
        self.failures += 1
        if self.max_reconnects is not None and self.failures > self.max_reconnects:
            if isinstance(error, httpx.TransportError):
                raise TransportError(f"subscription to {self.name!r}: {_describe(error)}")
            if isinstance(error, EmaError):
                raise error
            raise TransportError(f"subscription to {self.name!r}: the service closed it")
        base = self.parser.retry_ms / 1000 if self.parser.retry_ms is not None else None
        retry_after = error.retry_after if isinstance(error, ApiError) else None
        return self.retry.delay(self.failures, retry_after if retry_after is not None else base)


class _SubscriptionBase:
    def __init__(self, resume: _Resume) -> None:
        self._resume = resume

    @property
    def last_event_id(self) -> str | None:
        """The id of the last event received: pass it as `last_event_id` to resume later."""
        return self._resume.last_event_id


class Subscription(_SubscriptionBase):
    """Iterates over a stream's updates as they happen, reconnecting with Last-Event-ID (the
    service replays what was missed) after a dropped connection. Close it, or use `with`."""

    def __init__(self, http: httpx.Client, resume: _Resume) -> None:
        super().__init__(resume)
        self._events = self._run(http)

    def _run(self, http: httpx.Client) -> Generator[Event]:
        while True:
            call = self._resume.call()
            error: Exception | None = None
            try:
                with http.stream(
                    "GET", call.path, headers=call.headers, timeout=self._resume.timeout
                ) as r:
                    if r.is_error:
                        r.read()
                    self._resume.opened(r)
                    for line in r.iter_lines():
                        event = self._resume.line(line)
                        if event is not None:
                            yield event
            except (httpx.TransportError, ApiError) as failure:
                error = failure
            time.sleep(self._resume.dropped(error))

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def close(self) -> None:
        """Ends the subscription and its connection."""
        self._events.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class AsyncSubscription(_SubscriptionBase):
    """The async `Subscription`: `async for event in ...`; close it, or use `async with`."""

    def __init__(self, http: httpx.AsyncClient, resume: _Resume) -> None:
        super().__init__(resume)
        self._events = self._run(http)

    async def _run(self, http: httpx.AsyncClient) -> AsyncGenerator[Event]:
        while True:
            call = self._resume.call()
            error: Exception | None = None
            try:
                async with http.stream(
                    "GET", call.path, headers=call.headers, timeout=self._resume.timeout
                ) as r:
                    if r.is_error:
                        await r.aread()
                    self._resume.opened(r)
                    async for line in r.aiter_lines():
                        event = self._resume.line(line)
                        if event is not None:
                            yield event
            except (httpx.TransportError, ApiError) as failure:
                error = failure
            await anyio.sleep(self._resume.dropped(error))

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        return await anext(self._events)

    async def aclose(self) -> None:
        """Ends the subscription and its connection."""
        await self._events.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()


# --- the clients ------------------------------------------------------------------------------


class _ClientBase:
    """What both clients share: where the service is, the headers every call sends, retries."""

    def __init__(
        self,
        url: str | None,
        api_key: str | None,
        timeout: float,
        retry: Retry,
    ) -> None:
        self.url = service_url(url or os.environ.get(URL_VARIABLE) or DEFAULT_URL)
        self.retry = retry
        self.timeout = timeout
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_VARIABLE)
        self.headers = {"user-agent": f"ema-client/{__version__}", "accept": "application/json"}
        if api_key:
            if not (api_key.isascii() and api_key.isprintable()) or " " in api_key:
                raise ConfigurationError("the API key has characters a header cannot carry")
            self.headers["authorization"] = f"Bearer {api_key}"
        self._features: Features | None = None

    def _options(self) -> dict[str, Any]:
        return {"base_url": self.url, "headers": self.headers, "timeout": self.timeout}

    def _resume(
        self,
        name: str,
        last_event_id: str | None,
        max_reconnects: int | None,
        idle_timeout: float | None,
    ) -> _Resume:
        timeout = httpx.Timeout(self.timeout, read=idle_timeout)
        return _Resume(name, last_event_id, self.retry, max_reconnects, timeout)


class Client(_ClientBase):
    """The EMA service's sync client. One connection pool, reused by every call; use it as a
    context manager, or `close()` it.

    `url` defaults to $EMA_URL, then http://127.0.0.1:8000; `api_key` to $EMA_API_KEY (sent as
    `Authorization: Bearer <key>`). `timeout` is in seconds; `retry` is the policy for calls
    that are safe to repeat (see the module's docs; `NO_RETRY` turns retries off).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        retry: Retry = DEFAULT_RETRY,
    ) -> None:
        super().__init__(url, api_key, timeout, retry)
        self._http = httpx.Client(**self._options())

    def _run(self, call: _Call[T]) -> T:
        attempts = _Attempts(self.retry, call)
        while True:
            try:
                response = self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    content=call.content(),
                    headers=call.headers_to_send(),
                )
            except httpx.TransportError as error:
                time.sleep(attempts.after_error(error))
                continue
            delay = attempts.after_response(response)
            if delay is None:
                return call.parse(response)
            time.sleep(delay)

    def create(
        self,
        name: str,
        *,
        decay: float | None = None,
        halflife: float | None = None,
        initial: float | None = None,
        auto_num_updates: bool = False,
        **config: Any,
    ) -> State:
        """Creates the stream, or replaces its configuration (its state starts over). Give a
        `decay` or a `halflife`; `config` takes the other fields of the service's StreamConfig
        (kind, windows, late, ttl, history, arithmetic)."""
        return self._run(
            _Calls.create(name, _config(decay, halflife, initial, auto_num_updates, config))
        )

    def get(self, name: str) -> State:
        """The stream's state; raises NotFound when there is no such stream."""
        return self._run(_Calls.get(name))

    def delete(self, name: str) -> None:
        """Deletes the stream; raises NotFound when there is no such stream."""
        self._run(_Calls.delete(name))

    def push(
        self,
        name: str,
        value: float,
        *,
        num_updates: int | None = None,
        idempotent: bool = False,
        idempotency_key: str | None = None,
    ) -> State:
        """Applies one value (with TensorFlow's `num_updates`, the step, if given) and returns
        the new state. `idempotent=True` sends a fresh Idempotency-Key, or pass your own key:
        only such a push is retried (an unkeyed one may have been applied when its reply was
        lost)."""
        sample = Sample(value, num_updates)
        return self._run(_Calls.push(name, sample, idempotent, idempotency_key))

    def push_many(
        self,
        name: str,
        values: Sequence[Value],
        *,
        idempotent: bool = False,
        idempotency_key: str | None = None,
    ) -> State:
        """Applies values in order, atomically (one bad value applies none). Each is a number
        or a `Sample(value=..., num_updates=...)`. Retried only when keyed, as for `push`."""
        return self._run(_Calls.push(name, list(values), idempotent, idempotency_key))

    def push_bulk(self, entries: Mapping[str, Value | Sequence[Value]]) -> list[BulkResult]:
        """Pushes to several streams in one request: {stream: value or list of values}. One
        result per stream, in order. Never retried. Raises NotSupported on a service without
        the bulk endpoint."""
        return self._run(_Calls.push_bulk(entries))

    def list_page(
        self, prefix: str = "", *, cursor: str | None = None, limit: int = 100, states: bool = False
    ) -> Page:
        """One page of names; pass its `next_cursor` back as `cursor` until it is None.
        `states=True` also returns each listed stream's state (in one request)."""
        return self._run(_Calls.page(prefix, cursor, limit, states))

    def list_streams(self, prefix: str = "", *, page_size: int = 100) -> Iterator[str]:
        """Every stream name starting with `prefix`, once each, fetching pages as it goes."""
        seen: set[str] = set()
        cursor: str | None = None
        while True:
            page = self.list_page(prefix, cursor=cursor, limit=page_size)
            yield from _unseen(page, seen)
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def subscribe(
        self,
        name: str,
        *,
        last_event_id: str | None = None,
        max_reconnects: int | None = None,
        idle_timeout: float | None = 60.0,
    ) -> Subscription:
        """The stream's updates as they happen (`Update`, or `Lagged` when this subscriber fell
        behind), reconnecting with backoff and Last-Event-ID after a dropped connection, at most
        `max_reconnects` times in a row (None: forever). A connection silent for `idle_timeout`
        seconds (no event, no heartbeat) counts as dropped."""
        resume = self._resume(name, last_event_id, max_reconnects, idle_timeout)
        return Subscription(self._http, resume)

    def features(self) -> Features:
        """What this service offers beyond the core API (fetched once)."""
        if self._features is None:
            self._features = self._run(_Calls.features())
        return self._features

    def close(self) -> None:
        """Closes the connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """The EMA service's async client: the same calls as `Client`, awaited. One connection
    pool, reused by every call; use it with `async with`, or `await aclose()`."""

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        retry: Retry = DEFAULT_RETRY,
    ) -> None:
        super().__init__(url, api_key, timeout, retry)
        self._http = httpx.AsyncClient(**self._options())

    async def _run(self, call: _Call[T]) -> T:
        attempts = _Attempts(self.retry, call)
        while True:
            try:
                response = await self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    content=call.content(),
                    headers=call.headers_to_send(),
                )
            except httpx.TransportError as error:
                await anyio.sleep(attempts.after_error(error))
                continue
            delay = attempts.after_response(response)
            if delay is None:
                return call.parse(response)
            await anyio.sleep(delay)

    async def create(
        self,
        name: str,
        *,
        decay: float | None = None,
        halflife: float | None = None,
        initial: float | None = None,
        auto_num_updates: bool = False,
        **config: Any,
    ) -> State:
        """Creates the stream, or replaces its configuration (its state starts over). Give a
        `decay` or a `halflife`; `config` takes the other fields of the service's StreamConfig
        (kind, windows, late, ttl, history, arithmetic)."""
        return await self._run(
            _Calls.create(name, _config(decay, halflife, initial, auto_num_updates, config))
        )

    async def get(self, name: str) -> State:
        """The stream's state; raises NotFound when there is no such stream."""
        return await self._run(_Calls.get(name))

    async def delete(self, name: str) -> None:
        """Deletes the stream; raises NotFound when there is no such stream."""
        await self._run(_Calls.delete(name))

    async def push(
        self,
        name: str,
        value: float,
        *,
        num_updates: int | None = None,
        idempotent: bool = False,
        idempotency_key: str | None = None,
    ) -> State:
        """Applies one value; see `Client.push`."""
        sample = Sample(value, num_updates)
        return await self._run(_Calls.push(name, sample, idempotent, idempotency_key))

    async def push_many(
        self,
        name: str,
        values: Sequence[Value],
        *,
        idempotent: bool = False,
        idempotency_key: str | None = None,
    ) -> State:
        """Applies values in order, atomically; see `Client.push_many`."""
        return await self._run(_Calls.push(name, list(values), idempotent, idempotency_key))

    async def push_bulk(self, entries: Mapping[str, Value | Sequence[Value]]) -> list[BulkResult]:
        """Pushes to several streams in one request; see `Client.push_bulk`."""
        return await self._run(_Calls.push_bulk(entries))

    async def list_page(
        self, prefix: str = "", *, cursor: str | None = None, limit: int = 100, states: bool = False
    ) -> Page:
        """One page of names; pass its `next_cursor` back as `cursor` until it is None.
        `states=True` also returns each listed stream's state (in one request)."""
        return await self._run(_Calls.page(prefix, cursor, limit, states))

    async def list_streams(self, prefix: str = "", *, page_size: int = 100) -> AsyncIterator[str]:
        """Every stream name starting with `prefix`, once each, fetching pages as it goes."""
        seen: set[str] = set()
        cursor: str | None = None
        while True:
            page = await self.list_page(prefix, cursor=cursor, limit=page_size)
            for name in _unseen(page, seen):
                yield name
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def subscribe(
        self,
        name: str,
        *,
        last_event_id: str | None = None,
        max_reconnects: int | None = None,
        idle_timeout: float | None = 60.0,
    ) -> AsyncSubscription:
        """The stream's updates as they happen; see `Client.subscribe`."""
        resume = self._resume(name, last_event_id, max_reconnects, idle_timeout)
        return AsyncSubscription(self._http, resume)

    async def features(self) -> Features:
        """What this service offers beyond the core API (fetched once)."""
        if self._features is None:
            self._features = await self._run(_Calls.features())
        return self._features

    async def aclose(self) -> None:
        """Closes the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


def _unseen(page: Page, seen: set[str]) -> list[str]:
    # SCAN may list a name twice; the iterators give each once.
    fresh = [name for name in page.streams if name not in seen]
    seen.update(fresh)
    return fresh


__all__ = [
    "NO_RETRY",
    "ApiError",
    "AsyncClient",
    "AsyncSubscription",
    "BulkResult",
    "Client",
    "ConfigurationError",
    "Conflict",
    "EmaError",
    "Event",
    "Features",
    "Forbidden",
    "InvalidInput",
    "Lagged",
    "NotFound",
    "NotSupported",
    "Page",
    "PayloadTooLarge",
    "ProtocolError",
    "RateLimited",
    "Retry",
    "Sample",
    "ServiceUnavailable",
    "State",
    "Subscription",
    "TransportError",
    "Unauthorized",
    "Update",
    "error_for",
    "service_url",
]
