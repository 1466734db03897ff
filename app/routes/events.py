"""Server-Sent Events: a stream's updates as they are applied, through any replica."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.deps import HubDep, SettingsDep, StoreDep, StreamName
from app.errors import StoreUnavailable, StreamNotFound, problem_responses
from app.events import EventHub, Lagged, Subscription, SubscriptionLimit
from app.keys import NAME_MAX_LENGTH
from app.models import MAX_COUNT
from app.protocol import write_now_of
from app.store import StreamStore

router = APIRouter(tags=["events"])

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_EVENT_STREAM: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "An event stream",
    }
}


def _lagged(missed: int | None) -> bytes:
    return f"event: lagged\ndata: {json.dumps({'missed': missed})}\n\n".encode()


async def _replay(store: StreamStore, name: str, after: int) -> AsyncIterator[tuple[bytes, int]]:
    """What a client that saw event `after` missed, from the history: (text, last id).

    The history keeps each value's count, main value, raw value, sample time, std and z, not the
    whole state: a replayed event carries those (`timestamp` is the sample's time), marked
    `replayed`."""
    try:
        current = (await store.get(name)).count
    except StreamNotFound:
        return
    if current < after:  # the stream was reset (PUT) since: all of its new counts were missed
        after = 0
    if current <= after:
        return
    since = after
    while since < current:
        page = await store.history(name, since, 1000)
        if not page.entries:
            break
        if page.entries[0].id > since + 1:
            yield _lagged(page.entries[0].id - since - 1), since
        for entry in page.entries:
            data = {
                "name": name,
                "count": entry.id,
                "value": entry.value,
                "last": entry.raw,
                "timestamp": entry.time,
                "std": entry.std,
                "z": entry.z,
                "replayed": True,
            }
            yield f"id: {entry.id}\nevent: update\ndata: {json.dumps(data)}\n\n".encode(), entry.id
        since = page.entries[-1].id
    if since < current:
        yield _lagged(current - since), current


async def _follow(
    subscription: Subscription,
    heartbeat: float,
    with_ids: bool,
    replay: AsyncIterator[tuple[bytes, int]] | None,
) -> AsyncIterator[bytes]:
    yield b"retry: 1000\n\n"
    while not subscription.ready.is_set():
        try:
            await asyncio.wait_for(subscription.ready.wait(), heartbeat)
        except TimeoutError:
            yield b": waiting for Redis\n\n"
    yield b": subscribed\n\n"
    if replay is not None:
        try:
            async for text, replayed in replay:
                yield text
                subscription.replayed = replayed
        except StoreUnavailable:
            yield _lagged(None)
    while True:
        items = await subscription.take(heartbeat)
        if not items:
            yield b": keep-alive\n\n"
            continue
        # All that is queued goes in one write; a batch most often alone, its bytes as the hub
        # joined them for every subscriber of the stream.
        chunk: list[bytes] = []
        for item in items:
            if item is None:
                yield b"".join([*chunk, b"event: shutdown\ndata: {}\n\n"])
                return
            if isinstance(item, Lagged):
                chunk.append(_lagged(item.missed))
            elif item.lowest > subscription.replayed:
                chunk.append(item.events_with_ids if with_ids else item.events)
            else:
                for update in item.updates:
                    if update.count > subscription.replayed or update.count == 0:
                        # Counts up to the last replayed were sent already; but a count of 0
                        # announces a reset (PUT), after which the counts start over.
                        if update.count == 0:
                            subscription.replayed = -1
                        chunk.append(update.event_with_id if with_ids else update.event)
        if chunk:
            yield chunk[0] if len(chunk) == 1 else b"".join(chunk)


class _EventStream(StreamingResponse):
    """An event stream that ends its subscription when the response ends, however it ends,
    even if its body never started (the client left first)."""

    def __init__(
        self, body: AsyncIterator[bytes], hub: EventHub, subscription: Subscription
    ) -> None:
        super().__init__(body, media_type="text/event-stream", headers=_SSE_HEADERS)
        self._hub = hub
        self._subscription = subscription

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The hub writes straight to the response where the server lets it (app.protocol).
        self._subscription.write_now = write_now_of(scope)
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._hub.release(self._subscription)


def _stream(
    hub: EventHub,
    heartbeat: float,
    *,
    name: str | None = None,
    prefix: str | None = None,
    replay: AsyncIterator[tuple[bytes, int]] | None = None,
) -> StreamingResponse:
    # Subscribed here, before the 200 is sent: a full hub is a 503, not a broken stream.
    try:
        subscription = hub.open(name=name, prefix=prefix)
    except SubscriptionLimit:
        raise StoreUnavailable(
            "the subscription limit of this process is reached", retry_after=5
        ) from None
    return _EventStream(
        _follow(subscription, heartbeat, name is not None, replay), hub, subscription
    )


@router.get(
    "/v1/streams/{name}/events",
    response_class=StreamingResponse,
    responses={**_EVENT_STREAM, **problem_responses(422)},
)
async def stream_events(
    name: StreamName,
    hub: HubDep,
    store: StoreDep,
    settings: SettingsDep,
    last_event_id: Annotated[
        int | None,
        Header(
            ge=0,
            le=MAX_COUNT,
            description="The id of the last event received: what was missed since is replayed "
            "from the stream's history, or announced as a `lagged` event.",
        ),
    ] = None,
) -> StreamingResponse:
    """Server-Sent Events of the stream's updates, as they are applied by any replica.

    `event: update` carries the new state (`id:` is the stream's count; a PUT that resets the
    stream sends count 0, and the counts start over). Events replayed from the history after a
    reconnection carry name, count, value, last, timestamp (the sample's time), std, z and
    `replayed: true`, what the history keeps. `event: lagged`
    carries `{"missed": n}` when updates were lost to this subscriber (n null: unknown);
    comment lines are heartbeats; `event: shutdown` ends the stream when the service stops.
    """
    replay = None if last_event_id is None else _replay(store, name, last_event_id)
    return _stream(hub, settings.sse_heartbeat, name=name, replay=replay)


@router.get(
    "/v1/events",
    response_class=StreamingResponse,
    responses={**_EVENT_STREAM, **problem_responses(422)},
)
async def stream_many_events(
    hub: HubDep,
    settings: SettingsDep,
    prefix: Annotated[
        str,
        Query(
            pattern=r"^[A-Za-z0-9_.:\-]*$",
            max_length=NAME_MAX_LENGTH,
            description="Streams whose name starts with this; empty: every stream.",
        ),
    ] = "",
) -> StreamingResponse:
    """Server-Sent Events of the updates of every stream whose name starts with `prefix`.

    Events carry the stream's name in their data and no id: there is no replay on reconnect.
    """
    return _stream(hub, settings.sse_heartbeat, prefix=prefix)
