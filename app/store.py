"""StreamStore: the only code that talks to Redis. Driver errors become domain errors here."""

import base64
import binascii
import hashlib
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol, cast

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from app.errors import InvalidInput, StoreUnavailable, StreamNotFound
from app.keys import NAME_PATTERN, KeyLayout
from app.models import HistoryEntry, HistoryPage, StreamConfig, StreamPage, StreamState
from app.scripts import STATE_FIELDS, Defaults, Fields, Idempotency, Scripts, format_number

# Replies that mean "Redis cannot serve this right now": worth a 503 and a retry, never a 500.
_TRANSIENT_REPLIES = ("BUSY", "LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN")
# Keys examined per SCAN call, and SCAN calls per listing request: bounds one request's work.
_SCAN_COUNT = 500
_SCAN_CALLS = 64
_VALID_NAME = re.compile(NAME_PATTERN)
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)
IDEMPOTENCY_KEY_RULE = "1 to 255 visible ASCII characters"


class StoreObserver(Protocol):
    """What the store reports as it talks to Redis (app.metrics.Metrics listens)."""

    def script_ran(self, seconds: float) -> None: ...

    def applied(self, values: int) -> None: ...

    def redis_error(self, kind: str) -> None: ...


class StreamStore:
    """Named EMA streams kept in Redis hashes, updated by one Lua script."""

    def __init__(
        self,
        client: "Redis",
        layout: KeyLayout,
        *,
        defaults: StreamConfig | None,
        max_batch: int,
        idempotency_seconds: int = 86_400,
        announce: bool = True,
        retry_after: int = 1,
        observer: StoreObserver | None = None,
    ) -> None:
        """`defaults` configures streams created by a push; None makes such a push a 404.
        `announce` publishes every update for subscribers."""
        self._client = client
        self._layout = layout
        self._scripts = Scripts(client)
        self._create_with = (
            None
            if defaults is None
            else Defaults(
                defaults.decay, defaults.initial, defaults.auto_num_updates, defaults.history
            )
        )
        self._max_batch = max_batch
        self._idempotency_seconds = idempotency_seconds
        self._announce = announce
        self._retry_after = retry_after
        self._observer = observer

    @asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        try:
            yield
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as error:
            # Includes BusyLoadingError. A timed-out write may still have been applied.
            self._report_error(_error_kind(error))
            raise StoreUnavailable(
                f"Redis is unavailable ({type(error).__name__}); a write that timed out may "
                "or may not have been applied",
                retry_after=self._retry_after,
            ) from error
        except redis_errors.ResponseError as error:
            message = str(error)
            if message.startswith(_TRANSIENT_REPLIES):
                self._report_error(message.split()[0].lower())
                raise StoreUnavailable(
                    f"Redis is unavailable ({message.split()[0]})", retry_after=self._retry_after
                ) from error
            if not message.startswith("EMA_"):  # the push script's own refusals are not
                self._report_error("error")
            raise

    def _report_error(self, kind: str) -> None:
        if self._observer is not None:
            self._observer.redis_error(kind)

    async def ping(self) -> None:
        async with self._errors():
            await self._client.ping()

    async def configure(self, name: str, config: StreamConfig) -> tuple[StreamState, bool]:
        """Create or replace a stream: its configuration set, its state reset. True if created."""
        # Any: redis-py types mapping keys as its whole (invariant) key union.
        fields: dict[Any, str] = {
            "d": format_number(config.decay),
            "a": "1" if config.auto_num_updates else "0",
            "h": str(config.history),
            "n": "0",
            "b": "0",
            "p": "1",
        }
        if config.initial is not None:
            fields["i"] = fields["v"] = format_number(config.initial)
        key = self._layout.stream(name)
        async with self._errors(), self._client.pipeline(transaction=True) as pipe:
            pipe.delete(key, self._layout.history(name))
            pipe.hset(key, mapping=fields)
            pipe.hmget(key, STATE_FIELDS)
            existed, _, state = await pipe.execute()
        return StreamState.from_fields(name, state), not existed

    async def get(self, name: str) -> StreamState:
        async with self._errors():
            fields = cast(Fields, await self._client.hmget(self._layout.stream(name), STATE_FIELDS))
        if fields[0] is None:
            raise StreamNotFound(name)
        return StreamState.from_fields(name, fields)

    async def delete(self, name: str) -> None:
        async with self._errors():
            # The history goes too; idempotency records expire on their own.
            deleted = await self._client.delete(
                self._layout.stream(name), self._layout.history(name)
            )
        if not deleted:
            raise StreamNotFound(name)

    async def push(
        self,
        name: str,
        samples: Sequence[tuple[float, int | None]],
        idempotency_key: str | None = None,
    ) -> tuple[StreamState, bool]:
        """Apply samples (value, num_updates) in order, atomically, creating the stream if
        allowed. Returns the new state, and True when it is the stored result of an earlier
        push with the same idempotency key (which was not applied again).

        The batch is capped because a Lua script blocks every other client while it runs.
        """
        if len(samples) > self._max_batch:
            raise InvalidInput(f"values: at most {self._max_batch} per push, got {len(samples)}")
        idempotency = None
        if idempotency_key is not None:
            if not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
                raise InvalidInput(f"Idempotency-Key: {IDEMPOTENCY_KEY_RULE}")
            idempotency = Idempotency(
                self._layout.idempotency(name, idempotency_key),
                _fingerprint(samples),
                self._idempotency_seconds,
            )
        started = time.perf_counter()
        try:
            async with self._errors():
                fields, replayed = await self._scripts.push(
                    (self._layout.stream(name), self._layout.history(name)),
                    samples,
                    create_with=self._create_with,
                    idempotency=idempotency,
                    channel=self._layout.channel(name) if self._announce else None,
                )
        except redis_errors.ResponseError as error:
            message = str(error)
            if message.startswith("EMA_NOT_FOUND"):
                raise StreamNotFound(name) from error
            if message.startswith("EMA_INVALID"):
                raise InvalidInput(message.removeprefix("EMA_INVALID ")) from error
            if message.startswith("EMA_IDEMPOTENCY_MISMATCH"):
                raise InvalidInput(
                    "Idempotency-Key: already used for a different push to this stream"
                ) from error
            raise
        finally:
            if self._observer is not None:
                self._observer.script_ran(time.perf_counter() - started)
        if self._observer is not None and not replayed:
            self._observer.applied(len(samples))
        return StreamState.from_fields(name, fields), replayed

    async def states(self, names: Sequence[str]) -> list[StreamState]:
        """The states of those of `names` that exist, in one round trip."""
        async with self._errors(), self._client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hmget(self._layout.stream(name), STATE_FIELDS)
            replies = await pipe.execute()
        return [
            StreamState.from_fields(name, fields)
            for name, fields in zip(names, replies, strict=True)
            if fields[0] is not None
        ]

    async def history(self, name: str, since: int, limit: int) -> HistoryPage:
        """The oldest `limit` history entries with an id (count) above `since`."""
        async with self._errors(), self._client.pipeline(transaction=False) as pipe:
            pipe.exists(self._layout.stream(name))
            pipe.xrange(self._layout.history(name), min=f"({since}-0", count=limit)
            exists, entries = await pipe.execute()
        if not exists:
            raise StreamNotFound(name)
        page = [
            HistoryEntry(
                id=int(entry_id.split("-")[0]),
                time=float(fields["t"]),
                raw=float(fields["l"]),
                value=float(fields["v"]),
            )
            for entry_id, fields in entries
        ]
        more = len(page) == limit
        return HistoryPage(entries=page, next_since=page[-1].id if more else None)

    async def list(self, prefix: str, cursor: str | None, limit: int) -> StreamPage:
        """Up to `limit` names starting with `prefix`, in no particular order, by SCAN.

        The cursor is (SCAN cursor, last name returned from that SCAN batch): a page may stop
        inside a batch, and re-reading the batch resumes after that name. As with SCAN, a
        stream that exists for the whole listing is returned at least once.
        """
        scan_cursor, after = _decode_cursor(cursor)
        pattern = self._layout.scan_pattern(prefix)
        names: list[str] = []
        async with self._errors():
            for _ in range(_SCAN_CALLS):
                next_cursor, keys = await self._client.scan(
                    scan_cursor, match=pattern, count=_SCAN_COUNT
                )
                batch = sorted(
                    name
                    for name in {self._layout.name_of(str(key)) for key in keys}
                    if name > after and _VALID_NAME.match(name)
                )
                after = ""
                room = limit - len(names)
                if len(batch) > room:
                    names += batch[:room]
                    resume = _encode_cursor(scan_cursor, names[-1])
                    return StreamPage(streams=names, next_cursor=resume)
                names += batch
                if next_cursor == 0:
                    return StreamPage(streams=names, next_cursor=None)
                scan_cursor = next_cursor
                if len(names) == limit:
                    break
        return StreamPage(streams=names, next_cursor=_encode_cursor(scan_cursor, ""))


def _error_kind(error: Exception) -> str:
    if isinstance(error, redis_errors.TimeoutError):
        return "timeout"
    if isinstance(error, redis_errors.BusyLoadingError):
        return "loading"
    return "connection"


def _fingerprint(samples: Sequence[tuple[float, int | None]]) -> str:
    # Of the parsed push, not its bytes: {"value": 5} and {"value": 5.0} are the same push.
    text = ";".join(f"{format_number(value)},{steps}" for value, steps in samples)
    return hashlib.sha256(text.encode()).hexdigest()


def _encode_cursor(scan_cursor: int, after: str) -> str:
    return base64.urlsafe_b64encode(f"{scan_cursor}/{after}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> tuple[int, str]:
    if not cursor:
        return 0, ""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        scan_cursor, after = text.split("/", 1)
        if not scan_cursor.isdigit() or (after and not _VALID_NAME.match(after)):
            raise ValueError(text)
        return int(scan_cursor), after
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidInput("cursor: not a cursor returned by this service") from None
