"""The stream resource: configure, read, delete, push to and list EMA streams."""

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from app.deps import StoreDep, StreamName
from app.errors import problem_responses as _problems
from app.keys import NAME_MAX_LENGTH
from app.models import Push, StreamConfig, StreamPage, StreamState

router = APIRouter(prefix="/v1/streams", tags=["streams"])


@router.put(
    "/{name}",
    response_model=StreamState,
    responses={201: {"model": StreamState, "description": "Created"}, **_problems(422)},
)
async def put_stream(
    name: StreamName, config: StreamConfig, store: StoreDep, response: Response
) -> StreamState:
    """Create or replace a stream. Replacing resets its state: the shadow starts over."""
    state, created = await store.configure(name, config)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return state


@router.get("/{name}", responses=_problems(404, 422))
async def get_stream(name: StreamName, store: StoreDep) -> StreamState:
    """The stream's current state and configuration."""
    return await store.get(name)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, responses=_problems(404, 422))
async def delete_stream(name: StreamName, store: StoreDep) -> None:
    """Delete a stream and its state."""
    await store.delete(name)


@router.post("/{name}/values", responses=_problems(404, 413, 422))
async def push_values(name: StreamName, push: Push, store: StoreDep) -> StreamState:
    """Apply one value, or a list applied in order, in one atomic update.

    A push to a stream that does not exist creates it with the server's default configuration
    (unless EMA_AUTO_CREATE is false). If any value is invalid, nothing is applied.
    """
    return await store.push(name, push.samples())


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
) -> StreamPage:
    """List stream names page by page (Redis SCAN, never KEYS): a page may hold fewer than
    `limit` names even when more follow; the listing ends when next_cursor is null."""
    return await store.list(prefix, cursor, limit)
