"""Live updates: the push script announces each update on the stream's Redis Pub/Sub channel;
each service process keeps one Pub/Sub connection and fans the announcements out to its
subscribers, so a subscriber sees pushes applied through any replica.

The updates of one channel (or pattern) are gathered for all of its subscribers at once: each
is rendered once, and those that arrive within one write interval (25 ms) are joined into one
batch, whose bytes every subscriber of the channel writes as they are, in one write. So a push
costs the process the same whatever the number of subscribers; each subscriber costs at most one
write per interval. An update after a quiet spell still goes at once. Where the server offers
it (app.protocol's `ema.write_now`), a batch is written to each subscriber that waits for one
right away, by the hub, without waking the subscriber's task.

A subscriber has a bounded queue: a slow one never slows pushes or other subscribers. When its
queue is full it loses the oldest updates and is told how many (a `lagged` event) rather than
being skipped silently; the same happens to every subscriber when the Pub/Sub connection drops.
"""

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol, cast

import hiredis
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection

from app.codec import RecentReplies, reply_json
from app.keys import KeyLayout

log = logging.getLogger(__name__)

_RECONNECT_DELAY = 0.5
# The least time between two batches of one channel: under a steady flow of updates each write
# carries all that arrived meanwhile (for the service and the client alike, fewer and larger
# writes), while an update after a quiet spell still goes at once.
WRITE_INTERVAL = 0.025


class Update:
    """One applied update, rendered once for all the subscribers of the process: the state's
    JSON, and the event as bytes, as a stream's own subscribers get it (with its count as the
    event's id) and as a prefix's get it (without).

    One heard from Pub/Sub is rendered when its batch is handed out (`render`), not as it
    arrives: by then the push's reply has been rendered, if this process served the push, and
    its JSON is taken from RecentReplies instead (unless the batch went at once, the first
    update after a quiet spell, and was heard before its reply came)."""

    __slots__ = ("_event", "_event_with_id", "count", "data", "name", "text")

    def __init__(self, name: str, text: str | None = None) -> None:
        self.name = name
        self.text = text  # the announcement, until rendered
        self.count = 0
        self.data = b""
        self._event: bytes | None = None
        self._event_with_id: bytes | None = None

    def render(self, replies: RecentReplies | None) -> None:
        """Read the announcement, once."""
        text = self.text
        if text is None:
            return
        self.text = None
        rendered = replies.take(self.name, text) if replies is not None else None
        self.count, self.data = rendered or reply_json(self.name, text)

    @property
    def event(self) -> bytes:
        if self._event is None:
            self._event = b"event: update\ndata: " + self.data + b"\n\n"
        return self._event

    @property
    def event_with_id(self) -> bytes:
        if self._event_with_id is None:
            self._event_with_id = b"id: %d\n" % self.count + self.event
        return self._event_with_id


@dataclass(eq=False)
class Batch:
    """The updates of one channel or pattern within one write interval, oldest first: their
    events joined once, the same bytes for all its subscribers."""

    updates: list[Update]

    @cached_property
    def lowest(self) -> int:
        """The lowest count in the batch."""
        return min(update.count for update in self.updates)

    @cached_property
    def events(self) -> bytes:
        return b"".join([update.event for update in self.updates])

    @cached_property
    def events_with_ids(self) -> bytes:
        return b"".join([update.event_with_id for update in self.updates])


@dataclass
class Lagged:
    """Updates a subscriber did not get: `missed` of them, or an unknown number (None)."""

    missed: int | None


class _Beat:
    """Put in a waiting subscriber's queue when its heartbeat is due."""


_BEAT = _Beat()
Item = Batch | Lagged | _Beat | None


def _size(item: Item) -> int:
    """The updates an item of a subscriber's queue stands for (a Lagged counts as one)."""
    if isinstance(item, Batch):
        return len(item.updates)
    return 0 if item is _BEAT else 1


class UpdateQueue(asyncio.Queue[Item]):
    """A subscriber's queue, which counts the updates it holds."""

    held = 0

    def _put(self, item: Item) -> None:
        super()._put(item)
        self.held += _size(item)

    def _get(self) -> Item:
        item: Item = super()._get()
        self.held -= _size(item)
        return item


@dataclass(eq=False)
class Subscription:
    """One subscriber's queue of batches of updates for one channel or pattern; or, while its
    reader waits with nothing queued, its response itself (`write_now`)."""

    topic: str
    is_pattern: bool
    queue_size: int
    updates: UpdateQueue = field(default_factory=UpdateQueue)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # Writes a batch's bytes to the subscriber's response at once, if it can (app.protocol's
    # `ema.write_now`), from when the response has started; None: every batch is queued.
    write_now: Callable[[bytes], bool] | None = None
    # The highest count already sent from the stream's history: the reader checks the updates
    # up to it, which it must not send again.
    replayed: int = -1
    # The heartbeat: one timer per heartbeat interval, not one per wait (a wait per write).
    _alarm: asyncio.TimerHandle | None = field(default=None, repr=False)
    _waiting_since: float | None = field(default=None, repr=False)
    # The reader waits with nothing queued: a batch may go straight to the response.
    _direct: bool = field(default=False, repr=False)

    def deliver(self, batch: Batch, now: float) -> None:
        """Write `batch` to the response now if the reader waits for it and the response takes
        it without waiting (as the reader would write it); else queue it (`offer`)."""
        if self._direct and batch.lowest > self.replayed and self.write_now is not None:
            try:
                written = self.write_now(batch.events if self.is_pattern else batch.events_with_ids)
            except Exception:
                # A server that breaks the extension's promise must not cost the other
                # subscribers of the batch their update: this one is served by its reader.
                log.exception("an event batch could not be written at once; queued instead")
                self.write_now, written = None, False
            if written:
                self._waiting_since = now  # the heartbeat is due that much later
                return
        self.offer(batch)

    def offer(self, item: Batch | Lagged) -> None:
        """Queue a batch; when the queue would hold more than `queue_size` updates, what it
        held is replaced by one Lagged counting the updates lost (a batch alone is never cut)."""
        self._direct = False  # what comes next goes after it, through the reader
        held = self.updates.held
        if held and held + _size(item) > self.queue_size:
            missed: int | None = 0
            while not self.updates.empty():
                dropped = self.updates.get_nowait()
                if missed is None or dropped is None or dropped is _BEAT:
                    continue
                if isinstance(dropped, Lagged):
                    missed = None if dropped.missed is None else missed + dropped.missed
                elif isinstance(dropped, Batch):
                    missed += len(dropped.updates)
            self.updates.put_nowait(Lagged(missed))
        self.updates.put_nowait(item)

    async def take(self, within: float) -> list[Batch | Lagged | None]:
        """Everything queued, oldest first, waiting up to `within` seconds for something to
        come (empty: nothing came). None ends the subscription."""
        items: list[Batch | Lagged | None] = []
        if self.updates.empty():
            loop = asyncio.get_running_loop()
            self._waiting_since = now = loop.time()
            if self._alarm is None:
                self._alarm = loop.call_at(now + within, self._ring, loop, within)
            self._direct = True
            try:
                first = await self.updates.get()
            finally:
                self._direct = False
            self._waiting_since = None
            if isinstance(first, _Beat):
                return items
            items.append(first)
        while not self.updates.empty():
            item = self.updates.get_nowait()
            if not isinstance(item, _Beat):
                items.append(item)
        return items

    def _ring(self, loop: asyncio.AbstractEventLoop, within: float) -> None:
        """A heartbeat to a reader waiting for `within` seconds; else the alarm is set again
        for when that would be, or left for the next wait to set."""
        self._alarm = None
        if self._waiting_since is None:
            return
        due = self._waiting_since + within
        if loop.time() >= due:
            self.updates.put_nowait(_BEAT)
        else:
            self._alarm = loop.call_at(due, self._ring, loop, within)

    def close(self) -> None:
        """End the subscription: its reader gets None after what is queued."""
        self.ready.set()
        self._direct = False
        self.updates.put_nowait(None)


@dataclass(eq=False)
class _Topic:
    """The subscriptions of one channel or pattern, and the updates they have yet to get: at
    most one batch per write interval, shared by all of them."""

    loop: asyncio.AbstractEventLoop
    replies: RecentReplies | None = None
    subscriptions: set[Subscription] = field(default_factory=set)
    pending: list[Update] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    flushed: float = -math.inf  # the loop's time of the last batch

    def add(self, update: Update) -> None:
        self.pending.append(update)
        if self.timer is None:
            at = max(self.loop.time(), self.flushed + WRITE_INTERVAL)
            self.timer = self.loop.call_at(at, self.flush)

    def flush(self) -> None:
        """Hand what is pending to every subscription, as one batch."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.pending:
            return
        for update in self.pending:
            update.render(self.replies)
        batch = Batch(self.pending)
        self.pending = []
        self.flushed = now = self.loop.time()
        for subscription in self.subscriptions:
            subscription.deliver(batch, now)


class SubscriptionLimit(Exception):
    """The process already serves its maximum number of subscriptions."""


class EventHub:
    """One Pub/Sub connection per process, shared by all its subscribers."""

    def __init__(
        self,
        source: "PubSubSource",
        layout: KeyLayout,
        *,
        queue_size: int,
        max_subscriptions: int,
        replies: RecentReplies | None = None,
    ) -> None:
        self._source = source
        self._replies = replies
        self._layout = layout
        self._queue_size = queue_size
        self._max_subscriptions = max_subscriptions
        self._topics: dict[str, _Topic] = {}
        self._confirmed: set[str] = set()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._last: tuple[str, Update] | None = None  # the last announcement heard

    @property
    def count(self) -> int:
        return sum(len(topic.subscriptions) for topic in self._topics.values())

    @property
    def full(self) -> bool:
        return self._closing or self.count >= self._max_subscriptions

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-hub")

    async def close(self) -> None:
        """End every subscription (their streams finish cleanly) and the Pub/Sub connection."""
        self._closing = True
        for topic in list(self._topics.values()):
            topic.flush()
            for subscription in topic.subscriptions:
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
        topic = self._topics.get(subscription.topic)
        if topic is None:
            loop = asyncio.get_running_loop()
            topic = self._topics[subscription.topic] = _Topic(loop, self._replies)
            self._want_replies()
        # What is pending arrived before this subscription: it goes to the others now.
        topic.flush()
        topic.subscriptions.add(subscription)
        if subscription.topic in self._confirmed:
            subscription.ready.set()
        self._changed.set()
        return subscription

    def release(self, subscription: Subscription) -> None:
        topic = self._topics.get(subscription.topic)
        if topic is None or subscription not in topic.subscriptions:
            return
        topic.subscriptions.discard(subscription)
        if not topic.subscriptions:
            if topic.timer is not None:
                topic.timer.cancel()
            del self._topics[subscription.topic]
            self._want_replies()
        self._changed.set()

    def _want_replies(self) -> None:
        if self._replies is not None:
            self._replies.wanted = bool(self._topics)

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
        while not self._closing:
            self._confirmed.clear()
            try:
                await self._serve()
            except Exception as error:  # the hub must outlive any failure: retry after a pause
                log.warning("event hub lost Redis (%r); reconnecting", error)
                for topic in self._topics.values():
                    topic.flush()  # what arrived before the loss, then the news of it
                    for subscription in topic.subscriptions:
                        subscription.offer(Lagged(None))
                await asyncio.sleep(_RECONNECT_DELAY)

    async def _serve(self) -> None:
        """Keep one connection subscribed to the topics wanted, and hear them on it: this task
        alone sends on the connection (the subscribers just record what they want), and what
        it receives goes to the hub as it arrives (_Hearing). The connection is made once a
        topic is wanted."""
        while not self._topics:
            await self._changed.wait()
            self._changed.clear()
        connection = self._source.connection()
        try:
            await connection.connect()  # type: ignore[no-untyped-call]
            hearing = _Hearing(connection, self._hear, self._changed.set)
            subscribed: set[str] = set()
            while True:
                self._sync(hearing, subscribed)
                await self._changed.wait()
                self._changed.clear()
                hearing.check()
        finally:
            await connection.disconnect(nowait=True)

    def _sync(self, hearing: "_Hearing", subscribed: set[str]) -> None:
        wanted = set(self._topics)
        for topic in wanted - subscribed:
            hearing.send("PSUBSCRIBE" if topic.endswith("*}:events") else "SUBSCRIBE", topic)
        for topic in subscribed - wanted:
            self._confirmed.discard(topic)
            hearing.send("PUNSUBSCRIBE" if topic.endswith("*}:events") else "UNSUBSCRIBE", topic)
        subscribed.clear()
        subscribed.update(wanted)

    def _hear(self, reply: list[str]) -> None:
        """One reply on the Pub/Sub connection: an announcement, or a subscription's news."""
        kind = reply[0]
        if kind == "message":
            self._dispatch(reply[1], reply[1], reply[2])
        elif kind == "pmessage":
            self._dispatch(reply[1], reply[2], reply[3])
        elif kind in ("subscribe", "psubscribe"):
            self._confirm(reply[1])

    def _confirm(self, topic_name: str) -> None:
        self._confirmed.add(topic_name)
        topic = self._topics.get(topic_name)
        for subscription in topic.subscriptions if topic else ():
            subscription.ready.set()

    def _dispatch(self, topic_name: str, channel: str, data: str) -> None:
        topic = self._topics.get(topic_name)
        if topic is None:
            return
        # The same announcement comes once per matching subscription (a stream's own and a
        # prefix's): one Update, rendered once.
        last = self._last
        if last is not None and last[0] == channel and last[1].text == data:
            update = last[1]
        else:
            update = Update(self._layout.name_of_channel(channel), data)
            self._last = (channel, update)
        topic.add(update)


class _Hearing(asyncio.Protocol):
    """What the hub's Pub/Sub connection receives, once redis-py has made it (connected,
    authenticated, over RESP2): parsed (hiredis) and handed to the hub in the very callback
    that receives the bytes. Through redis-py's reader, each time bytes arrived a stream reader
    woke a future, a task and four coroutines before the first message was read: with pushes
    arriving one by one, that cost more than the messages themselves."""

    def __init__(
        self,
        connection: AbstractConnection,
        hear: Callable[[list[str]], None],
        ended: Callable[[], None],
    ) -> None:
        # The connection's transport is public asyncio, its StreamWriter private to redis-py.
        transport = connection._writer.transport  # type: ignore[union-attr]
        self._hear = hear  # each reply
        self._ended = ended  # once, when the connection ends: `check` raises why
        self._reader = hiredis.Reader(encoding="utf-8", errors="surrogateescape")
        self._transport = transport
        self._replaced = transport.get_protocol()  # told when the connection ends
        self._error: Exception | None = None
        transport.set_protocol(self)

    def send(self, *command: str) -> None:
        self._transport.write(hiredis.pack_command(cast(Any, command)))  # typed as a 1-tuple

    def check(self) -> None:
        """Raise what ended the connection, if it ended."""
        if self._error is not None:
            raise self._error

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                if isinstance(reply, Exception):  # an error reply: a subscription refused
                    raise reply
                self._hear(reply)
        except Exception as error:
            self._end(error)
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc or ConnectionError("the Pub/Sub connection closed"))
        self._replaced.connection_lost(exc)

    def _end(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
            self._ended()


class PubSubSource(Protocol):
    """Where the hub gets a new connection for Pub/Sub (at start and after each failure)."""

    def connection(self) -> AbstractConnection: ...


def _resp2_connection(
    connection_class: type[AbstractConnection], kwargs: dict[str, Any]
) -> AbstractConnection:
    """A connection made as `kwargs` say, over RESP2 whatever they say: a message arrives as a
    plain array rather than a push reply. Without RESP3, no maintenance notifications (a Redis
    Enterprise feature): the hub reconnects when a connection fails."""
    resp2 = {k: v for k, v in kwargs.items() if not k.startswith("maint_notifications")}
    resp2["protocol"] = 2
    return connection_class(**resp2)


class OneNode:
    """Pub/Sub connections to the server of a client (see _resp2_connection)."""

    def __init__(self, client: Redis) -> None:
        self._pool = client.connection_pool

    def connection(self) -> AbstractConnection:
        return _resp2_connection(self._pool.connection_class, self._pool.connection_kwargs)


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

    def connection(self) -> AbstractConnection:
        nodes = sorted(self._cluster.get_nodes() or self._cluster.startup_nodes, key=str)
        node = nodes[self._turn % len(nodes)]
        self._turn += 1
        return _resp2_connection(node.connection_class, node.connection_kwargs)
