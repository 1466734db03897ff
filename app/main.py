"""The application factory. `app.main:app` is the ASGI app that uvicorn serves."""

import asyncio
import gc
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from types import FrameType
from typing import Any, cast

import anyio
import hiredis
from fastapi import FastAPI
from redis.asyncio import Connection, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.typing import EncodableT
from starlette.types import ASGIApp, Receive, Scope, Send

from app import __version__, errors, openapi
from app.asgi import BodyLimit, Bookkeeping, FastPaths, JsonByDefault
from app.auth import ApiKeyAuth
from app.embedded import EmbeddedRedis
from app.events import AnyClusterNode, EventHub, OneNode
from app.keys import KeyLayout
from app.lifetime import worker_dies_with_supervisor
from app.metrics import Metrics
from app.routes import events, health, metrics, streams, ui, values
from app.settings import Settings
from app.store import open_store

log = logging.getLogger("app")

DESCRIPTION = """
Named exponential moving averages, kept in Redis and updated atomically by one Lua script, with
the update of TensorFlow's `tf.train.ExponentialMovingAverage`:
`shadow -= (1 - decay) * (shadow - value)`, with `decay = min(decay, (1 + num_updates) /
(10 + num_updates))` when a push carries `num_updates`.

A stream's `arithmetic` says how: `float64` (the default) evaluates that form in exact float64
(the worked example, initial 0, decay 0.99, pushes 5 at step 0 and 10 twice at step 10000,
gives 4.5, 4.555, 4.60945), which is not what TensorFlow computes; `tensorflow-float64` and
`tensorflow-float32` reproduce real TensorFlow 2.21 bit for bit on a float64 variable
(4.4999998807907104, 4.554999829530715, 4.609449779307839) or a float32 variable (4.5,
4.554999828338623, 4.609449863433838): float32 decay and `1 - decay`, values rounded to float32
for a float32 variable, subnormals flushed to zero. Numbers cross as exact float64 decimals.

Each stream also reports the exponentially weighted `variance` and `std` of its values (pandas'
bias-corrected `ewm(...).var()`) and the last value's `z`-score.

Errors are `application/problem+json` (RFC 9457).
"""


class LiveConnection(Connection):
    """Replaces a pooled connection that Redis closed while it sat idle (Redis restarted, or
    closed it) before writing a command on it, rather than after.

    Written on a dead socket, a command would fail when its reply is read, and then nobody
    could tell whether it ran: a 503 "may or may not have been applied" for each pooled
    connection after every Redis restart. redis-py's own check as the pool hands out a
    connection is skipped while maintenance notifications are on (their default, "auto", in
    redis-py 8), and the cluster client has none."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        reader, writer = self._reader, self._writer
        if (
            reader is not None
            and writer is not None
            and (reader.at_eof() or reader.exception() is not None or writer.is_closing())
        ):
            await self.disconnect(nowait=True)  # the base class connects again
        await super().send_packed_command(command, check_health)


class HiredisPackedConnection(LiveConnection):
    """Packs commands with hiredis (C) rather than redis-py's pure Python: measured here, a
    single push's EVALSHA packs in 2 us instead of 23, a 1,000-value push in 0.6 ms instead of
    4.5."""

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # redis-py's "SCRIPT LOAD" style
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(cast(Any, args))]  # its stub types a 1-tuple
        except TypeError:
            # A bytearray or memoryview, which hiredis refuses: converted only then, since a
            # pass over every argument would double the cost of a 1,000-value push's packing.
            packed = tuple(bytes(a) if isinstance(a, bytearray | memoryview) else a for a in args)
            return [hiredis.pack_command(cast(Any, packed))]


def redis_client(url: str, settings: Settings) -> "Redis | RedisCluster":
    # No automatic retries: a command that timed out may already have run, and re-sending a
    # push would apply it twice. The client gets a 503 instead and decides.
    common: dict[str, Any] = {
        "decode_responses": True,
        # A stream's packed state (push.lua's `s`) is binary: decoded so, it comes back as its
        # own bytes with .encode("utf-8", "surrogateescape") (app.codec.state_numbers).
        "encoding_errors": "surrogateescape",
        "socket_timeout": settings.redis_timeout,
        "socket_connect_timeout": settings.redis_timeout,
        "retry": Retry(NoBackoff(), 0),
        "max_connections": settings.redis_max_connections,  # per node, in a cluster
    }
    if settings.redis_cluster:
        # The cluster client follows MOVED and ASK redirections (the command did not run where
        # it was sent), and waits out TRYAGAIN; with 0 retries it never re-sends a command after
        # a connection error or timeout, but re-reads the cluster's topology before the next
        # command, which is how it finds a replica promoted after a failover. A NOSCRIPT from a
        # new primary is answered by loading the script and calling it again (redis-py's
        # Script and StreamStore.push_many): a command refused with NOSCRIPT did not run.
        cluster = RedisCluster.from_url(
            url,
            **common,
            # A MOVED patches the slot map (a failover's first MOVED moves the whole shard):
            # never the periodic full refresh, which closes every node's connections, and with
            # them the commands in flight on healthy nodes, whose outcome would be unknown.
            reinitialize_steps=0,
        )
        if url.startswith("redis://"):
            # The asyncio cluster client takes no connection class: its nodes read it from
            # the connection kwargs it shares with its nodes manager (the nodes it will
            # discover), and the startup nodes have theirs already (no connection made yet).
            cluster.connection_kwargs["connection_class"] = LiveConnection
            for node in cluster.startup_nodes:
                node.connection_class = LiveConnection
        return cluster
    if url.startswith("redis://"):  # TLS and unix sockets keep their own connection classes
        common["connection_class"] = HiredisPackedConnection
    return Redis.from_url(url, **common)


@contextmanager
def _end_subscriptions_on_exit_signal(hub: EventHub) -> Iterator[None]:
    """On SIGTERM or SIGINT, end every event stream, then let the server's handler run.

    uvicorn stops accepting and waits for open responses before it runs the lifespan's
    shutdown: without this, an event stream would hold the process until it is killed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(sig: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(hub.close()))
        server_handler = previous[signal.Signals(sig)]
        if callable(server_handler):
            server_handler(sig, frame)

    for sig, server_handler in previous.items():
        if callable(server_handler):  # only when a server installed one, as uvicorn does
            signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, server_handler in previous.items():
            if callable(server_handler):
                signal.signal(sig, server_handler)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    worker_dies_with_supervisor()  # before it starts anything of its own, such as a Redis
    if not settings.api_keys:
        log.warning(
            "NO API KEYS CONFIGURED: anyone who can reach this service can read, write and "
            "delete every stream. Set EMA_API_KEYS or EMA_API_KEYS_FILE (python -m app.auth)."
        )
    embedded = None
    url = settings.redis_url
    if url is None:
        embedded = EmbeddedRedis(settings.data_dir)
        url = await anyio.to_thread.run_sync(embedded.start)
    client = redis_client(url, settings)
    app.state.store = open_store(client, settings, observer=app.state.metrics)
    app.state.hub = hub = EventHub(
        AnyClusterNode(client) if isinstance(client, RedisCluster) else OneNode(client),
        KeyLayout(settings.key_prefix),
        queue_size=settings.subscriber_queue,
        max_subscriptions=settings.max_subscriptions,
        replies=app.state.store.replies,
    )
    hub.start()
    # What the process holds once started (the framework, pydantic's validators and
    # serialisers, the app, the clients) lives as long as it serves: kept out of the garbage
    # collector's scans, which went over all of it again and again. Measured, one worker,
    # alternated: 89 -> 79 us of CPU a push, 948 -> 766 a batch of 1,000 values.
    gc.freeze()
    try:
        with _end_subscriptions_on_exit_signal(hub):
            yield
    finally:
        gc.unfreeze()  # collectable again: several apps may start and stop in one process
        await hub.close()
        await client.aclose()
        app.state.metrics.close()
        if embedded is not None:
            await anyio.to_thread.run_sync(embedded.stop)


class Service(FastAPI):
    """FastAPI with plain ASGI layers in front of its whole middleware stack (app.asgi): the
    requests the fast paths answer never enter the framework, whose outer layers (error
    handling, telemetry checks, body limit) cost a push as much as the bookkeeping. An error a
    fast path does not handle becomes the framework's 500 problem all the same (Bookkeeping)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.front: ASGIApp = self._framework

    def add_front(self, layer: Callable[..., ASGIApp], **options: Any) -> None:
        """Put `layer` in front of the layers added so far (the last added runs first)."""
        self.front = layer(self.front, **options)

    async def _framework(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self  # as the framework sets it: the layers read app.state
        await self.front(scope, receive, send)


def create_app(settings: Settings | None = None) -> Service:
    """Build the service. Redis is connected in the lifespan, not here."""
    settings = settings or Settings()
    app = Service(
        title="EMA service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=openapi.operation_id,
    )
    app.state.settings = settings
    openapi.install(app)
    errors.install(app)
    app.include_router(streams.router)
    app.include_router(values.router)
    app.include_router(events.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(ui.router)
    app.mount("/static", ui.static_files(), name="static")
    # Added innermost first: the body limit sees every request before anything reads a body.
    app.add_front(JsonByDefault)
    if settings.fast_path:
        app.add_front(FastPaths)
    app.add_front(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.api_keys:
        app.add_front(ApiKeyAuth, keys=settings.api_keys)
    # Outermost: counts and logs every request, those the fast paths and the auth layer answer
    # included.
    app.state.metrics = Metrics(
        stream_prefixes=settings.metrics_prefixes, max_streams=settings.metrics_max_streams
    )
    app.add_front(Bookkeeping, metrics=app.state.metrics, access_log=settings.access_log)
    app.state.metrics.precreate_routes(app.routes)
    return app


def __getattr__(name: str) -> Service:
    # `uvicorn app.main:app` resolves this attribute: building the app on first access keeps
    # importing this module free of side effects such as reading the environment.
    if name == "app":
        application = globals()["app"] = create_app()
        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
