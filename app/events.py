"""Live updates: the push script announces each update on the stream's Redis Pub/Sub channel;
each service process keeps one Pub/Sub connection and fans the announcements out to its
subscribers, so a subscriber sees pushes applied through any replica.

A subscriber has a bounded queue: a slow one never slows pushes or other subscribers. When its
queue is full it loses the oldest updates and is told how many (a `lagged` event) rather than
being skipped silently; the same happens to every subscriber when the Pub/Sub connection drops.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.client import PubSub

from app.codec import decode_fields, state_json
from app.keys import KeyLayout
from app.models import StreamState

log = logging.getLogger(__name__)

_RECONNECT_DELAY = 0.5


@dataclass(frozen=True)
class Update:
    """One applied update, rendered once for all the subscribers of the process: the state's
    JSON, and the event as bytes, as a stream's own subscribers get it (with its count as the
    event's id) and as a prefix's get it (without)."""

    count: int
    data: bytes

    @classmethod
    def of(cls, state: StreamState) -> "Update":
        return cls(state.count, state.model_dump_json().encode())

    @classmethod
    def from_fields(cls, name: str, fields: Mapping[str, str]) -> "Update":
        return cls(int(fields["n"]), state_json(name, fields))

    @cached_property
    def event(self) -> bytes:
        return b"event: update\ndata: " + self.data + b"\n\n"

    @cached_property
    def event_with_id(self) -> bytes:
        return b"id: %d\n" % self.count + self.event


@dataclass
class Lagged:
    """Updates a subscriber did not get: `missed` of them, or an unknown number (None)."""

    missed: int | None


@dataclass(eq=False)
class Subscription:
    """One subscriber's queue of updates for one channel or pattern."""

    topic: str
    is_pattern: bool
    queue_size: int
    updates: asyncio.Queue[Update | Lagged | None] = field(default_factory=asyncio.Queue)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, item: Update | Lagged) -> None:
        """Queue an update; a full queue is replaced by one Lagged counting what it held."""
        if self.updates.qsize() >= self.queue_size:
            missed: int | None = 0
            while not self.updates.empty():
                dropped = self.updates.get_nowait()
                if missed is None or dropped is None:
                    continue
                if isinstance(dropped, Lagged):
                    missed = None if dropped.missed is None else missed + dropped.missed
                else:
                    missed += 1
            self.updates.put_nowait(Lagged(missed))
        self.updates.put_nowait(item)

    def close(self) -> None:
        """End the subscription: its reader gets None after what is queued."""
        self.ready.set()
        self.updates.put_nowait(None)


class SubscriptionLimit(Exception):
    """The process already serves its maximum number of subscriptions."""


class EventHub:
    """One Pub/Sub connection per process, shared by all its subscribers."""

    def __init__(
        self, client: "PubSubSource", layout: KeyLayout, *, queue_size: int, max_subscriptions: int
    ) -> None:
        self._client = client
        self._layout = layout
        self._queue_size = queue_size
        self._max_subscriptions = max_subscriptions
        self._subscribers: dict[str, set[Subscription]] = {}
        self._confirmed: set[str] = set()
        self._pubsub: PubSub | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._last: tuple[str, str, Update] | None = None  # the last announcement rendered

    @property
    def count(self) -> int:
        return sum(len(subscribers) for subscribers in self._subscribers.values())

    @property
    def full(self) -> bool:
        return self._closing or self.count >= self._max_subscriptions

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-hub")

    async def close(self) -> None:
        """End every subscription (their streams finish cleanly) and the Pub/Sub connection."""
        self._closing = True
        for subscribers in list(self._subscribers.values()):
            for subscription in subscribers:
                subscription.close()
        self._changed.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def open(self, *, name: str | None = None, prefix: str | None = None) -> Subscription:
        """Subscribe to one stream, or to every stream whose name starts with `prefix`, now:
        a full hub raises SubscriptionLimit here, before a response has started. End it with
        `release`."""
        if self.full:
            raise SubscriptionLimit
        if name is not None:
            subscription = Subscription(self._layout.channel(name), False, self._queue_size)
        else:
            pattern = self._layout.channel_pattern(prefix or "")
            subscription = Subscription(pattern, True, self._queue_size)
        self._subscribers.setdefault(subscription.topic, set()).add(subscription)
        if subscription.topic in self._confirmed:
            subscription.ready.set()
        self._changed.set()
        return subscription

    def release(self, subscription: Subscription) -> None:
        subscribers = self._subscribers.get(subscription.topic)
        if subscribers is None or subscription not in subscribers:
            return
        subscribers.discard(subscription)
        if not subscribers:
            del self._subscribers[subscription.topic]
        self._changed.set()

    @contextlib.asynccontextmanager
    async def subscribe(
        self, *, name: str | None = None, prefix: str | None = None
    ) -> AsyncIterator[Subscription]:
        """`open` and `release` around a block."""
        subscription = self.open(name=name, prefix=prefix)
        try:
            yield subscription
        finally:
            self.release(subscription)

    async def _run(self) -> None:
        subscribed: set[str] = set()
        while not self._closing:
            pubsub = self._client.pubsub()
            subscribed.clear()
            self._confirmed.clear()
            try:
                while not self._closing:
                    await self._sync(pubsub, subscribed)
                    if not subscribed:
                        await self._changed.wait()
                        continue
                    message = await pubsub.get_message(timeout=0.05)
                    if message is not None:
                        self._dispatch(message)
            except Exception as error:  # the hub must outlive any failure: retry after a pause
                log.warning("event hub lost Redis (%r); reconnecting", error)
                for subscribers in self._subscribers.values():
                    for subscription in subscribers:
                        subscription.offer(Lagged(None))
                await asyncio.sleep(_RECONNECT_DELAY)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _sync(self, pubsub: PubSub, subscribed: set[str]) -> None:
        # Only this task touches the connection: subscribers just record what they want.
        if not self._changed.is_set() and subscribed:
            return
        self._changed.clear()
        wanted = set(self._subscribers)
        for topic in wanted - subscribed:
            if topic.endswith("*}:events"):
                await pubsub.psubscribe(topic)
            else:
                await pubsub.subscribe(topic)
        for topic in subscribed - wanted:
            self._confirmed.discard(topic)
            if topic.endswith("*}:events"):
                await pubsub.punsubscribe(topic)
            else:
                await pubsub.unsubscribe(topic)
        subscribed.clear()
        subscribed.update(wanted)

    def _dispatch(self, message: dict[str, object]) -> None:
        kind = message["type"]
        if kind in ("subscribe", "psubscribe"):
            self._confirmed.add(str(message["channel"]))
            for subscription in self._subscribers.get(str(message["channel"]), ()):
                subscription.ready.set()
            return
        if kind not in ("message", "pmessage"):
            return
        channel, data = str(message["channel"]), str(message["data"])
        topic = str(message["pattern"]) if kind == "pmessage" else channel
        subscribers = self._subscribers.get(topic)
        if not subscribers:
            return
        # The same announcement comes once per matching subscription (a stream's own and a
        # prefix's): rendered once.
        last = self._last
        if last is not None and last[0] == channel and last[1] == data:
            update = last[2]
        else:
            name = self._layout.name_of_channel(channel)
            update = Update.from_fields(name, decode_fields(data))
            self._last = (channel, data, update)
        for subscription in subscribers:
            subscription.offer(update)


class PubSubSource(Protocol):
    """Where the hub gets a new Pub/Sub connection (at start and after each failure)."""

    def pubsub(self) -> PubSub: ...


class AnyClusterNode:
    """Pub/Sub connections on a Redis Cluster, each to one node, the next one each time.

    In a cluster a classic PUBLISH (the push script's) reaches every node, replicas included,
    so one plain connection to any node hears every stream's announcements. Moving to the next
    node the cluster client knows of at each reconnection leaves a dead node behind, with no
    need for the topology to be current.
    """

    def __init__(self, cluster: "RedisCluster") -> None:
        self._cluster = cluster
        self._turn = 0

    def pubsub(self) -> PubSub:
        nodes = sorted(self._cluster.get_nodes() or self._cluster.startup_nodes, key=str)
        node = nodes[self._turn % len(nodes)]
        self._turn += 1
        pool = ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
        return Redis(connection_pool=pool).pubsub()
