"""Annotated dependencies shared by the routes."""

from typing import Annotated

from fastapi import Depends, Path, Request

from app.keys import NAME_MAX_LENGTH, NAME_PATTERN, NAME_RULE
from app.store import StreamStore


def _store(request: Request) -> StreamStore:
    store: StreamStore = request.app.state.store
    return store


StoreDep = Annotated[StreamStore, Depends(_store)]
StreamName = Annotated[
    str,
    Path(
        pattern=NAME_PATTERN,
        max_length=NAME_MAX_LENGTH,
        description=f"The stream's name: {NAME_RULE}.",
        examples=["cpu"],
    ),
]
