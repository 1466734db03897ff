"""Annotated dependencies shared by the routes."""

from typing import Annotated

from fastapi import Depends, Path, Request

from app.events import EventHub
from app.keys import NAME_MAX_LENGTH, NAME_PATTERN, NAME_RULE
from app.metrics import Metrics
from app.settings import Settings
from app.store import StreamStore


def _store(request: Request) -> StreamStore:
    store: StreamStore = request.app.state.store
    return store


def _hub(request: Request) -> EventHub:
    hub: EventHub = request.app.state.hub
    return hub


def _metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


StoreDep = Annotated[StreamStore, Depends(_store)]
HubDep = Annotated[EventHub, Depends(_hub)]
SettingsDep = Annotated[Settings, Depends(_settings)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
StreamName = Annotated[
    str,
    Path(
        pattern=NAME_PATTERN,
        max_length=NAME_MAX_LENGTH,
        description=f"The stream's name: {NAME_RULE}.",
        examples=["cpu"],
    ),
]
