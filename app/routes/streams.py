"""The stream resource: configure, read, delete, push to and list EMA streams."""

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status

from app.codec import state_json
from app.deps import StoreDep, StreamName
from app.errors import problem_responses as _problems
from app.keys import NAME_MAX_LENGTH
from app.models import MAX_COUNT, HistoryPage, Push, StreamConfig, StreamPage, StreamState
from app.store import IDEMPOTENCY_KEY_PATTERN, IDEMPOTENCY_KEY_RULE

router = APIRouter(prefix="/v1/streams", tags=["streams"])


@router.put(
    "/{name}",
    response_model=StreamState,
    responses={201: {"model": StreamState, "description": "Created"}, **_problems(413, 422)},
)
async def put_stream(
    name: StreamName, config: StreamConfig, store: StoreDep, response: Response
) -> StreamState:
    """Create or replace a stream. Replacing resets its state: the shadow starts over."""
    state, created = await store.configure(name, config)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return state


@router.get("/{name}", response_model=StreamState, responses=_problems(404, 422))
async def get_stream(name: StreamName, store: StoreDep) -> Response:
    """The stream's current state and configuration."""
    # As the fast path answers (app.asgi.FastPaths): the state rendered straight from the hash.
    return _state_response(name, *await store.read(name))


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, responses=_problems(404, 422))
async def delete_stream(name: StreamName, store: StoreDep) -> None:
    """Delete a stream and its state."""
    await store.delete(name)


@router.post("/{name}/values", response_model=StreamState, responses=_problems(404, 409, 413, 422))
async def push_values(
    name: StreamName,
    push: Push,
    store: StoreDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            pattern=IDEMPOTENCY_KEY_PATTERN,
            description="Makes the push safe to retry: a push with a key already used for this "
            "stream (within EMA_IDEMPOTENCY_SECONDS) is not applied again and gets the original "
            f"result, marked `Idempotent-Replayed: true`. {IDEMPOTENCY_KEY_RULE}.",
            examples=["8c1f0d8e-4d1a-4b7e-9a57-7d2f8f4f6f2a"],
        ),
    ] = None,
) -> Response:
    """Apply one value, or a list applied in order, in one atomic update.

    A push to a stream that does not exist creates it with the server's default configuration
    (unless EMA_AUTO_CREATE is false). If any value is invalid, nothing is applied.
    """
    state, replayed = await store.push_state(name, push.samples(), idempotency_key)
    reply = Response(state, media_type="application/json")
    if replayed:
        reply.headers["Idempotent-Replayed"] = "true"
    return reply


@router.get("/{name}/history", responses=_problems(404, 422))
async def get_history(
    name: StreamName,
    store: StoreDep,
    since: Annotated[
        int,
        Query(
            ge=0, le=MAX_COUNT, description="Only entries with a larger id (the stream's count)."
        ),
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000, description="Most entries returned.")] = 1000,
) -> HistoryPage:
    """The stream's recent values, oldest first: kept when its configuration has `history`."""
    return await store.history(name, since, limit)


@router.get("", responses=_problems(422))
async def list_streams(
    store: StoreDep,
    prefix: Annotated[
        str,
        Query(
            pattern=r"^[A-Za-z0-9_.:\-]*$",
            max_length=NAME_MAX_LENGTH,
            description="Only names starting with this.",
        ),
    ] = "",
    cursor: Annotated[
        str | None, Query(max_length=512, description="next_cursor from the previous page.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="Most names in one page.")] = 100,
    states: Annotated[
        bool,
        Query(
            description="Also return each listed stream's state (as GET does), read in one "
            "round trip, and the server time they are as of."
        ),
    ] = False,
) -> StreamPage:
    """List stream names page by page (Redis SCAN, never KEYS): a page may hold fewer than
    `limit` names even when more follow; the listing ends when next_cursor is null. With
    `states=true` the page carries the streams' states too: an overview in one request."""
    page = await store.list_names(prefix, cursor, limit)
    if states:
        page.states, page.time = await store.states_at(page.streams)
    return page


def _state_response(name: str, fields: dict[str, str], now: float | None = None) -> Response:
    return Response(state_json(name, fields, now), media_type="application/json")
