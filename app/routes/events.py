"""Server-Sent Events: a stream's updates as they are applied, through any replica."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from starlette.responses import StreamingResponse

from app.deps import HubDep, SettingsDep, StoreDep, StreamName
from app.errors import StoreUnavailable, StreamNotFound, problem_responses
from app.events import EventHub, Lagged, Subscription, Update
from app.keys import NAME_MAX_LENGTH
from app.models import MAX_COUNT
from app.store import StreamStore

router = APIRouter(tags=["events"])

_BURST = 256
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_EVENT_STREAM: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "An event stream"}
}


def _update(update: Update, with_id: bool) -> str:
    head = f"id: {update.count}\n" if with_id else ""
    return f"{head}event: update\ndata: {update.data}\n\n"


def _lagged(missed: int | None) -> str:
    return f"event: lagged\ndata: {json.dumps({'missed': missed})}\n\n"


async def _replay(store: StreamStore, name: str, after: int) -> AsyncIterator[tuple[str, int]]:
    """What a client that saw event `after` missed, from the history: (text, last id)."""
    try:
        current = (await store.get(name)).count
    except StreamNotFound:
        return
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
                "value": entry.value,
                "last": entry.raw,
                "count": entry.id,
                "updated_at": entry.time,
            }
            yield f"id: {entry.id}\nevent: update\ndata: {json.dumps(data)}\n\n", entry.id
        since = page.entries[-1].id
    if since < current:
        yield _lagged(current - since), current


async def _follow(
    subscription: Subscription,
    heartbeat: float,
    with_ids: bool,
    replay: AsyncIterator[tuple[str, int]] | None,
) -> AsyncIterator[str]:
    yield "retry: 1000\n\n"
    while not subscription.ready.is_set():
        try:
            await asyncio.wait_for(subscription.ready.wait(), heartbeat)
        except TimeoutError:
            yield ": waiting for Redis\n\n"
    yield ": subscribed\n\n"
    seen = -1
    if replay is not None:
        try:
            async for text, replayed in replay:
                yield text
                seen = replayed
        except StoreUnavailable:
            yield _lagged(None)
    while True:
        try:
            first = await asyncio.wait_for(subscription.updates.get(), heartbeat)
        except TimeoutError:
            yield ": keep-alive\n\n"
            continue
        # Whatever else is queued goes in the same write: one send for a burst of updates.
        items = [first]
        while len(items) < _BURST and not subscription.updates.empty():
            items.append(subscription.updates.get_nowait())
        chunk: list[str] = []
        for item in items:
            if item is None:
                yield "".join([*chunk, "event: shutdown\ndata: {}\n\n"])
                return
            if isinstance(item, Lagged):
                chunk.append(_lagged(item.missed))
            elif item.count > seen:
                chunk.append(_update(item, with_ids))
        if chunk:
            yield "".join(chunk)


def _stream(
    hub: EventHub,
    heartbeat: float,
    *,
    name: str | None = None,
    prefix: str | None = None,
    replay: AsyncIterator[tuple[str, int]] | None = None,
) -> StreamingResponse:
    if hub.full:
        raise StoreUnavailable("the subscription limit of this process is reached", retry_after=5)

    async def body() -> AsyncIterator[str]:
        async with hub.subscribe(name=name, prefix=prefix) as subscription:
            async for text in _follow(subscription, heartbeat, name is not None, replay):
                yield text

    return StreamingResponse(body(), media_type="text/event-stream", headers=_SSE_HEADERS)


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

    `event: update` carries the new state (`id:` is the stream's count); `event: lagged`
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
