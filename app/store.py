"""The store: the only code that talks to Redis, in the shape of limits' RedisStorage and
RedisClusterStorage. StreamStore keeps the streams on one Redis server; ClusterStreamStore, on a
Redis Cluster, overrides only what differs there: pushes grouped by node, listings walking every
primary, the script loaded on a new primary, Redis' clock read through a key, readiness. Errors
of the Redis client become domain errors in one place, `_domain_error`. On one server, the single
commands of concurrent requests (a push, a GET) share writes to Redis (app.pipelining)."""

import asyncio
import base64
import binascii
import contextlib
import hashlib
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, cast

import redis
from redis import exceptions as redis_errors
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline

from app.codec import (
    RecentReplies,
    config_fields,
    encode_fields,
    history_entry,
    number,
    reply_json,
    state_from_fields,
)
from app.errors import InvalidInput, LateSample, ServiceError, StoreUnavailable, StreamNotFound
from app.keys import NAME_PATTERN, KeyLayout
from app.models import HistoryPage, Samples, StreamConfig, StreamPage, StreamState
from app.pipelining import AutoPipeline, CommandSender
from app.scripts import Idempotency, PushScript, is_replay, push_reply, push_reply_text
from app.settings import Settings

# Replies that mean "Redis cannot serve this right now": worth a 503 and a retry, never a 500.
_TRANSIENT_REPLIES = ("BUSY", "LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN")
# The most keys examined per SCAN call, and SCAN calls per listing request: they bound one
# request's work.
_SCAN_COUNT = 500
_SCAN_CALLS = 64
# What a call through redis-py may raise: its errors, and (see _raised_in_redis_client) the
# AttributeError or TypeError of a connection closed under it.
_CLIENT_ERRORS = (
    redis_errors.RedisError,
    redis_errors.RedisClusterException,
    AttributeError,
    TypeError,
)
_REDIS_PACKAGE = os.path.dirname(redis.__file__) + os.sep
_HASH_SLOTS = 16384
_VALID_NAME = re.compile(NAME_PATTERN)
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)
IDEMPOTENCY_KEY_RULE = "1 to 255 visible ASCII characters"
# Redis' clock, read by a script on the node of the key it is given (see _queue_time).
_TIME_SCRIPT = "return redis.call('TIME')"
_PUBLISH_SCRIPT = "return redis.call('PUBLISH', ARGV[1], ARGV[2])"


class StoreObserver(Protocol):
    """What the store reports as it talks to Redis (app.metrics.Metrics listens)."""

    def script_ran(self, seconds: float) -> None: ...

    def applied(self, values: int) -> None: ...

    def redis_error(self, kind: str) -> None: ...


@dataclass(frozen=True)
class PushRequest:
    """One entry of a bulk push: samples for one stream, and an optional idempotency key."""

    name: str
    samples: Samples
    idempotency_key: str | None = None


# What happened to one entry of a bulk push: its new state and whether it was an idempotent
# replay, or the error that entry alone got.
PushOutcome = tuple[StreamState, bool] | ServiceError
# A push as sent to Redis: its script's KEYS and ARGV.
PushCall = tuple[list[str], list[str]]


def open_store(
    client: "Redis | RedisCluster", settings: Settings, observer: StoreObserver | None = None
) -> "StreamStore":
    """The store for `client`: a cluster's, or a single server's."""
    if isinstance(client, RedisCluster):
        return ClusterStreamStore(client, settings, observer)
    return StreamStore(client, settings, observer)


class StreamStore:
    """Named EMA streams kept in Redis hashes, updated by one Lua script, on one Redis server."""

    def __init__(
        self,
        client: "Redis | RedisCluster",
        settings: Settings,
        observer: StoreObserver | None = None,
    ) -> None:
        self._client = client
        # A push's EVALSHA and a GET's HGETALL: the single commands of concurrent requests.
        self._commands = self._command_sender(client)
        self._layout = KeyLayout(settings.key_prefix)
        defaults = settings.stream_defaults()
        self._push_script = PushScript(
            client,
            create_with=None if defaults is None else config_fields(defaults),
            max_clock_skew=settings.max_clock_skew,
            commands=self._commands,
        )
        self._max_batch = settings.max_batch
        self._idempotency_seconds = settings.idempotency_seconds
        self._announce = settings.events
        self._retry_after = settings.retry_after
        self._observer = observer
        self.replies = RecentReplies()

    # --- errors ---------------------------------------------------------------------------------

    @contextmanager
    def _errors(self, name: str | None = None) -> Iterator[None]:
        """Raises the domain error for an error of the Redis client in the block (see
        `_domain_error`); an unexpected one goes on as it is, a 500 logged with its traceback."""
        try:
            yield
        except _CLIENT_ERRORS as error:
            failure = self._domain_error(error, name)
            if failure is None:
                raise
            raise failure from error

    def _domain_error(self, error: BaseException, name: str | None = None) -> ServiceError | None:
        """The one translation of what the Redis client raised, or replied in a pipeline, into
        a domain error, reported to the observer: a 503 for "Redis cannot serve this right now",
        the push script's own refusals (for the stream `name`), and None for an unexpected error
        (reported as such unless it is not Redis' at all: a bug of ours)."""
        if isinstance(error, redis_errors.NoScriptError):  # in a pipeline: not run
            return StoreUnavailable(
                "the push script was not loaded on its Redis node; not applied",
                retry_after=self._retry_after,
            )
        if isinstance(error, redis_errors.ResponseError) and str(error).startswith("EMA_"):
            return None if name is None else _script_refusal(name, error)
        if isinstance(error, redis_errors.ConnectionError | redis_errors.TimeoutError) or (
            isinstance(error, AttributeError | TypeError) and _raised_in_redis_client(error)
        ):
            # Includes BusyLoadingError. A timed-out write may still have been applied. The
            # cluster client can close a connection that another request is using (it does on
            # CLUSTERDOWN, during a failover): that request then fails inside redis-py with an
            # AttributeError, having sent its command or not.
            self._report_error(_error_kind(error))
            return StoreUnavailable(
                f"Redis is unavailable ({type(error).__name__}); a write that timed out may "
                "or may not have been applied",
                retry_after=self._retry_after,
            )
        if isinstance(error, redis_errors.RedisClusterException):
            # No node of the cluster answered, or a slot has no node (during a failover).
            self._report_error("clusterdown")
            return StoreUnavailable(
                f"Redis Cluster is unavailable ({error})", retry_after=self._retry_after
            )
        # redis-py strips the code from the replies it has a class for (READONLY, CLUSTERDOWN,
        # MASTERDOWN, TRYAGAIN) and keeps it in status_code.
        code = getattr(error, "status_code", None) or str(error).split(" ", 1)[0]
        if isinstance(error, redis_errors.RedisError) and code in _TRANSIENT_REPLIES:
            self._report_error(code.lower())
            return StoreUnavailable(f"Redis is unavailable ({code})", retry_after=self._retry_after)
        if isinstance(error, redis_errors.ClusterError):  # redirected too many times
            self._report_error("clusterdown")
            return StoreUnavailable(
                f"Redis Cluster is unavailable ({error})", retry_after=self._retry_after
            )
        if isinstance(error, redis_errors.RedisError):
            self._report_error("error")
        return None

    def _report_error(self, kind: str) -> None:
        if self._observer is not None:
            self._observer.redis_error(kind)

    # --- what differs on a cluster (ClusterStreamStore) ----------------------------------------

    def _command_sender(self, client: "Redis | RedisCluster") -> CommandSender:
        """Where single commands go: on one server, those of one event-loop turn in one write
        (app.pipelining)."""
        return AutoPipeline(cast(Redis, client))

    async def ping(self) -> None:
        """Redis answers."""
        with self._errors():
            await self._client.ping()

    async def _time(self, key: str) -> Sequence[str | int]:
        """Redis server's TIME (on a cluster, of the node of `key`)."""
        return cast(Sequence[str | int], await self._commands.execute_command("TIME"))

    def _queue_time(self, pipe: "Pipeline | ClusterPipeline", key: str) -> None:
        """Queue Redis server's TIME in a pipeline (on a cluster, of the node of `key`)."""
        pipe.time()

    def _queue_publish(
        self, pipe: "Pipeline | ClusterPipeline", key: str, channel: str, text: str
    ) -> None:
        """Queue a PUBLISH (on a cluster, from the node of `key`)."""
        pipe.publish(channel, text)

    async def _by_node(self, calls: dict[int, PushCall]) -> list[list[int]]:
        """The calls' indices grouped by the Redis node that serves their keys."""
        return [list(calls)] if calls else []

    async def _load_push_script(self) -> None:
        """After NOSCRIPT: a restarted Redis has an empty script cache."""
        with contextlib.suppress(redis_errors.RedisError):
            await self._push_script.load()  # shared with the single pushes refused meanwhile

    async def _scan(
        self, position: "Position", pattern: str, count: int
    ) -> tuple["Position | None", Sequence[str]]:
        """One SCAN call from `position`; the position after it, None when the walk is over."""
        _, scan_cursor = position
        next_cursor, keys = await self._client.scan(scan_cursor, match=pattern, count=count)
        return (None if next_cursor == 0 else (None, next_cursor)), cast(list[str], keys)

    # --- streams --------------------------------------------------------------------------------

    async def configure(self, name: str, config: StreamConfig) -> tuple[StreamState, bool]:
        """Create or replace a stream: its configuration set, its state reset. True if created."""
        # Any: redis-py types mapping keys as its whole (invariant) key union.
        fields: dict[Any, str] = dict(config_fields(config))
        key = self._layout.stream(name)
        with self._errors():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(key, self._layout.history(name))
                pipe.hset(key, mapping=fields)
                if config.ttl is not None:
                    pipe.expire(key, config.ttl)
                if self._announce:
                    # Subscribers learn that the state started over: an update of count 0,
                    # after which counts (the events' ids) start again from 1.
                    self._queue_publish(
                        pipe, key, self._layout.channel(name), encode_fields(fields)
                    )
                self._queue_time(pipe, key)
                existed, *_, now = await pipe.execute()
        return state_from_fields(name, fields, _seconds(now)), not existed

    async def get(self, name: str) -> StreamState:
        """The stream's state; a rate is reported as of Redis server time now."""
        states = await self.states([name])
        if not states:
            raise StreamNotFound(name)
        return states[0]

    async def delete(self, name: str) -> None:
        with self._errors():
            # The history goes too; idempotency records expire on their own.
            deleted = await self._commands.execute_command(
                "DEL", self._layout.stream(name), self._layout.history(name)
            )
        if not deleted:
            raise StreamNotFound(name)

    async def push(
        self,
        name: str,
        samples: Samples,
        idempotency_key: str | None = None,
    ) -> tuple[StreamState, bool]:
        """Apply samples in order, atomically, creating the stream if allowed. Returns the new
        state, and True when it is the stored result of an earlier push with the same
        idempotency key (which was not applied again)."""
        fields, replayed = push_reply(await self._push(name, samples, idempotency_key))
        return state_from_fields(name, fields), replayed

    async def push_state(
        self,
        name: str,
        samples: Samples,
        idempotency_key: str | None = None,
    ) -> tuple[bytes, bool]:
        """`push`, with the new state as its JSON (codec.reply_json): what a push replies.

        Kept in `replies` for the event hub, which would otherwise render it again from the
        push's announcement."""
        reply = await self._push(name, samples, idempotency_key)
        text, replayed = push_reply_text(reply)
        count, json = reply_json(name, text)
        if not replayed:  # a replay announces nothing
            self.replies.keep(name, reply, count, json)
        return json, replayed

    async def _push(self, name: str, samples: Samples, idempotency_key: str | None) -> str:
        """The push script's reply to `push`. The batch is capped because a Lua script blocks
        every other client while it runs."""
        count = len(samples)
        if count > self._max_batch:
            raise InvalidInput(f"values: at most {self._max_batch} per push, got {count}")
        keys, args = self._push_call(name, samples, idempotency_key)
        started = time.perf_counter()
        try:
            with self._errors(name):
                reply = await self._push_script.run(keys, args)
        finally:
            if self._observer is not None:
                self._observer.script_ran(time.perf_counter() - started)
        if self._observer is not None and not is_replay(reply):
            self._observer.applied(count)
        return reply

    def _push_call(self, name: str, samples: Samples, idempotency_key: str | None) -> PushCall:
        """The push script's KEYS and ARGV for a push to `name`; InvalidInput for a bad key."""
        idempotency = None
        if idempotency_key is not None:
            if not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
                raise InvalidInput(f"Idempotency-Key: {IDEMPOTENCY_KEY_RULE}")
            idempotency = Idempotency(
                self._layout.idempotency(name, idempotency_key),
                _fingerprint(samples),
                self._idempotency_seconds,
            )
        return self._push_script.call(
            (self._layout.stream(name), self._layout.history(name)),
            samples,
            idempotency=idempotency,
            channel=self._layout.channel(name) if self._announce else None,
        )

    async def push_many(self, pushes: Sequence[PushRequest]) -> list[PushOutcome]:
        """Apply each push as `push` does, each one its own atomic script call, in one pipeline
        per Redis node (in a cluster every node gets its pipeline at once). Returns, in request
        order, what happened to each push: an error fails that push alone.

        A node that fails mid-pipeline (connection lost, timeout) leaves whether its pushes were
        applied unknown: they get a 503 saying so, the others are unaffected. At most
        `max_batch` values in all, since a node runs its pipeline's scripts back to back.
        """
        total = sum(len(push.samples) for push in pushes)
        if total > self._max_batch:
            raise InvalidInput(
                f"entries: at most {self._max_batch} values per bulk push, got {total}"
            )
        outcomes: list[PushOutcome | None] = [None] * len(pushes)
        calls: dict[int, PushCall] = {}
        for index, push in enumerate(pushes):
            try:
                calls[index] = self._push_call(push.name, push.samples, push.idempotency_key)
            except InvalidInput as error:
                outcomes[index] = error
        with self._errors():  # nothing is sent before the groups are known
            groups = await self._by_node(calls)
        await asyncio.gather(
            *(self._push_pipeline(group, calls, pushes, outcomes) for group in groups)
        )
        return [outcome for outcome in outcomes if outcome is not None]

    async def _push_pipeline(
        self,
        indices: list[int],
        calls: dict[int, PushCall],
        pushes: Sequence[PushRequest],
        outcomes: list[PushOutcome | None],
    ) -> None:
        """Run the push calls `indices` (all for one node) in one non-transactional pipeline."""
        pending = indices
        for attempt in range(2):
            started = time.perf_counter()
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for index in pending:
                        keys, args = calls[index]
                        # pipe.evalsha is refused by a cluster pipeline, which cannot know
                        # the script is loaded: the NOSCRIPT replies are handled below.
                        pipe.execute_command(
                            "EVALSHA", self._push_script.sha, len(keys), *keys, *args
                        )
                    replies = await pipe.execute(raise_on_error=False)
            except _CLIENT_ERRORS as error:
                failed = self._domain_error(error) or _unexpected(error)
                for index in pending:
                    outcomes[index] = failed
                return
            finally:
                if self._observer is not None:
                    self._observer.script_ran(time.perf_counter() - started)
            unloaded: list[int] = []
            ran: set[str] = set()  # streams with an entry that ran, later in the pipeline
            for index, reply in reversed(list(zip(pending, replies, strict=True))):
                name = pushes[index].name
                # Not run: safe to send again once the script is loaded, unless someone loaded
                # it meanwhile and a later entry of this stream ran (it would land out of order).
                unrun = isinstance(reply, redis_errors.NoScriptError) and attempt == 0
                if unrun and name not in ran:
                    unloaded.insert(0, index)
                    continue
                ran.add(name)
                outcomes[index] = self._outcome(pushes[index], reply)
            if not unloaded:
                return
            await self._load_push_script()
            pending = unloaded

    def _outcome(self, push: PushRequest, reply: object) -> PushOutcome:
        if isinstance(reply, Exception):
            return self._domain_error(reply, push.name) or _unexpected(reply)
        fields, replayed = push_reply(reply)
        if self._observer is not None and not replayed:
            self._observer.applied(len(push.samples))
        return state_from_fields(push.name, fields), replayed

    async def read(self, name: str) -> tuple[dict[str, str], float | None]:
        """The stream's hash fields, and Redis server time now for a rate stream (whose rate is
        reported as of now; None for the others, whose state does not depend on time): what a
        GET returns, in one HGETALL for most streams."""
        key = self._layout.stream(name)
        with self._errors():
            fields = cast(dict[str, str], await self._commands.execute_command("HGETALL", key))
            if not fields:
                raise StreamNotFound(name)
            if fields.get("k") != "r":
                return fields, None
            now = await self._time(key)
        return fields, _seconds(now)

    async def states(self, names: Sequence[str]) -> list[StreamState]:
        """The states of those of `names` that exist, in one round trip, with rates as of Redis
        server time now."""
        return (await self.states_at(names))[0]

    async def states_at(self, names: Sequence[str]) -> tuple[list[StreamState], float]:
        """The states of those of `names` that exist, and the Redis server time they are as of
        (a rate stream's value is its rate then), in one round trip."""
        with self._errors():
            async with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hgetall(self._layout.stream(name))
                self._queue_time(pipe, self._layout.stream(names[0] if names else ""))
                *replies, time_reply = await pipe.execute()
        now = _seconds(time_reply)
        states = [
            state_from_fields(name, fields, now)
            for name, fields in zip(names, replies, strict=True)
            if fields
        ]
        return states, now

    async def history(self, name: str, since: int, limit: int) -> HistoryPage:
        """The oldest `limit` history entries with an id (count) above `since`, of the newest
        `history` (the Redis Stream, trimmed by whole nodes, may hold older ones: push.lua)."""
        with self._errors():
            count, cap = await self._client.hmget(self._layout.stream(name), ["n", "h"])
            if count is None:
                raise StreamNotFound(name)
            oldest = max(since, int(count) - int(cap or 0))
            entries = cast(
                list[tuple[str, dict[str, str]]],
                await self._client.xrange(
                    self._layout.history(name), min=f"({oldest}-0", count=limit
                ),
            )
        page = [history_entry(entry_id, fields) for entry_id, fields in entries]
        more = len(page) == limit
        return HistoryPage(entries=page, next_since=page[-1].id if more else None)

    async def list_names(self, prefix: str, cursor: str | None, limit: int) -> StreamPage:
        """Up to `limit` names starting with `prefix`, in no particular order, by SCAN.

        A page holds whole SCAN batches, asking each for about the room it has left, and stops
        before one that does not fit: the next page reads that batch again. Only a batch larger
        than a whole page is split; the cursor then carries (where the batch starts, the last
        name returned from it, where it ends), and the next page reads exactly that stretch of
        the keyspace again (`_rest_of_batch`) before going on. So a stream that exists for the
        whole listing is returned at least once, and no name twice while the keyspace does not
        change.
        """
        position, split = _decode_cursor(cursor)
        pattern = self._layout.scan_pattern(prefix)
        names: list[str] = []
        calls = 0
        with self._errors():
            if split is not None:
                end = split[1]
                rest, calls = await self._rest_of_batch(position, split, pattern, limit)
                if rest is None:  # not re-read within this page's calls: read it whole again
                    return StreamPage(streams=[], next_cursor=_encode_cursor(position))
                if len(rest) > limit:
                    names = rest[:limit]
                    next_cursor = _encode_cursor(position, (names[-1], end))
                    return StreamPage(streams=names, next_cursor=next_cursor)
                names, next_position = rest, end
            else:
                next_position = position
            count = limit - len(names)
            while next_position is not None and calls < _SCAN_CALLS and len(names) < limit:
                position = next_position
                room = limit - len(names)
                next_position, batch = await self._scan_names(position, pattern, count)
                calls += 1
                if len(batch) <= room:
                    names += batch
                    # Keys for about the room left, at the share of keys that were names.
                    count = min(_SCAN_COUNT, (room - len(batch)) * count // max(len(batch), 1))
                elif names:  # the next page reads this batch whole
                    return StreamPage(streams=names, next_cursor=_encode_cursor(position))
                else:
                    names = batch[:room]
                    next_cursor = _encode_cursor(position, (names[-1], next_position))
                    return StreamPage(streams=names, next_cursor=next_cursor)
        if next_position is None:
            return StreamPage(streams=names, next_cursor=None)
        return StreamPage(streams=names, next_cursor=_encode_cursor(next_position))

    async def _rest_of_batch(
        self, position: "Position", split: "Split", pattern: str, limit: int
    ) -> tuple[list[str] | None, int]:
        """The rest of a batch an earlier page split (returning its names up to `split`'s
        name): the names past that one in the batch from `position` to `split`'s end, read
        again, sorted; and the SCAN calls it took. None when that took more than a page makes.

        Reading from `position` with the COUNT the splitting page used ends at the same place
        unless Redis has resized its table in between (SCAN visits whole buckets, and a table
        being rehashed in bigger ones) or the limit changed: then a call that ends past the
        batch's end is repeated with half the count, down to one bucket (the bucket past the end
        is left for later), and a call that does not, followed by one with twice the count."""
        after, end = split
        names: set[str] = set()
        count = min(limit, _SCAN_COUNT)
        for calls in range(1, _SCAN_CALLS + 1):
            next_position, batch = await self._scan_names(position, pattern, count)
            if next_position != end and _order(next_position) > _order(end):
                if count == 1:
                    return sorted(names), calls
                count //= 2
                continue
            names.update(name for name in batch if name > after)
            if next_position is None or next_position == end:
                return sorted(names), calls
            position, count = next_position, min(2 * count, _SCAN_COUNT)
        return None, _SCAN_CALLS

    async def _scan_names(
        self, position: "Position", pattern: str, count: int
    ) -> tuple["Position | None", list[str]]:
        """One SCAN call: the position after it (None when the walk is over) and the stream
        names it found, sorted."""
        next_position, keys = await self._scan(position, pattern, min(count, _SCAN_COUNT))
        names = {self._layout.name_of(str(key)) for key in keys}
        return next_position, sorted(name for name in names if _VALID_NAME.match(name))


class ClusterStreamStore(StreamStore):
    """The streams on a Redis Cluster: a stream's keys share its hash slot (the name is their
    hash tag), so everything a request does to one stream is on one node."""

    def __init__(
        self, client: RedisCluster, settings: Settings, observer: StoreObserver | None = None
    ) -> None:
        super().__init__(client, settings, observer)
        self._cluster = client

    def _command_sender(self, client: "Redis | RedisCluster") -> CommandSender:
        # The cluster client routes each command to its node, follows MOVED and ASK, and
        # re-reads the topology after a failure: coalescing per node would have to redo all
        # that, so a cluster keeps one command per write.
        return client

    async def ping(self) -> None:
        """A node answers and says the cluster can serve (its `cluster_state` is ok).

        Not "every primary answers": with `cluster-require-full-coverage no` the other primaries
        serve while one is down, and failing every replica's readiness would make that partial
        outage a whole one."""
        with self._errors():
            info = await self._cluster.execute_command("CLUSTER INFO")
        state = info.get("cluster_state") if isinstance(info, dict) else None
        if state != "ok":
            self._report_error("clusterdown")
            raise StoreUnavailable(
                f"Redis Cluster is down (cluster_state {state})", retry_after=self._retry_after
            )

    async def _time(self, key: str) -> Sequence[str | int]:
        # A cluster routes TIME by no key: the node of the stream's key reads its clock.
        return cast(
            Sequence[str | int], await self._cluster.execute_command("EVAL", _TIME_SCRIPT, 1, key)
        )

    def _queue_time(self, pipe: "Pipeline | ClusterPipeline", key: str) -> None:
        # A cluster pipeline refuses TIME, which has no key to route it by (and a transaction
        # must stay on one node): the node of `key` reads its clock.
        pipe.execute_command("EVAL", _TIME_SCRIPT, 1, key)

    def _queue_publish(
        self, pipe: "Pipeline | ClusterPipeline", key: str, channel: str, text: str
    ) -> None:
        # A cluster pipeline refuses PUBLISH, which has no key: a script run on the node of
        # `key` publishes (a classic PUBLISH reaches every node anyway).
        pipe.execute_command("EVAL", _PUBLISH_SCRIPT, 1, key, channel, text)

    async def _by_node(self, calls: dict[int, PushCall]) -> list[list[int]]:
        await self._cluster.initialize()
        groups: dict[str, list[int]] = {}
        for index, (keys, _) in calls.items():
            node = self._cluster.get_node_from_key(keys[0])
            groups.setdefault(node.name if node else "", []).append(index)
        return list(groups.values())

    async def _load_push_script(self) -> None:
        # A newly promoted primary has an empty script cache; any primary may be new.
        await asyncio.gather(
            *(
                self._cluster.execute_command(
                    "SCRIPT LOAD", self._push_script.source, target_nodes=node
                )
                for node in self._cluster.get_primaries()
            ),
            return_exceptions=True,  # a primary that is down now will answer NOSCRIPT again
        )

    async def _scan(
        self, position: "Position", pattern: str, count: int
    ) -> tuple["Position | None", Sequence[str]]:
        """The walk goes through every primary in slot order; the position names the primary
        being walked by the first hash slot it serves (which a failover does not change)."""
        shard, scan_cursor = position
        await self._cluster.initialize()  # a no-op unless the topology must be (re)read
        shards = _first_slots(self._cluster)
        if shard is None:
            shard = shards[0]
        node = self._cluster.nodes_manager.get_node_from_slot(shard)
        cursors, keys = await self._cluster.execute_command(
            "SCAN", scan_cursor, "MATCH", pattern, "COUNT", count, target_nodes=node
        )
        next_cursor = int(cursors[node.name])
        if next_cursor != 0:
            return (shard, next_cursor), keys
        later = [first for first in shards if first > shard]
        return ((later[0], 0) if later else None), keys


def _script_refusal(name: str, error: redis_errors.ResponseError) -> ServiceError | None:
    """The domain error for the push script's own refusals (EMA_...), None for other errors."""
    message = str(error)
    if message.startswith("EMA_NOT_FOUND"):
        return StreamNotFound(name)
    if message.startswith("EMA_INVALID"):
        return InvalidInput(message.removeprefix("EMA_INVALID "))
    if message.startswith("EMA_LATE"):
        return LateSample(message.removeprefix("EMA_LATE "))
    if message.startswith("EMA_IDEMPOTENCY_MISMATCH"):
        return InvalidInput("Idempotency-Key: already used for a different push to this stream")
    return None


def _unexpected(error: BaseException) -> ServiceError:
    return ServiceError(f"Redis failed this push unexpectedly ({type(error).__name__}: {error})")


def _seconds(time_reply: Sequence[str | int]) -> float:
    seconds, micros = time_reply
    return int(seconds) + int(micros) / 1e6


def _raised_in_redis_client(error: BaseException) -> bool:
    """Was `error` raised by redis-py's own code (its innermost frame is in the package)?"""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and frame.tb_frame.f_code.co_filename.startswith(_REDIS_PACKAGE)


def _error_kind(error: Exception) -> str:
    if isinstance(error, redis_errors.TimeoutError):
        return "timeout"
    if isinstance(error, redis_errors.BusyLoadingError):
        return "loading"
    return "connection"


def _fingerprint(samples: Samples) -> str:
    # Of the parsed push, not its bytes: {"value": 5} and {"value": 5.0} are the same push.
    text = ";".join(f"{number(value)},{steps},{at}" for value, steps, at in samples)
    return hashlib.sha256(text.encode()).hexdigest()


# Where a listing is: (the first hash slot of the cluster primary being walked, None on a single
# Redis; the SCAN cursor on it).
Position = tuple[int | None, int]
# A SCAN batch a page split: the last name returned from it, and where it ends (None: the end of
# the walk). It starts at the cursor's position.
Split = tuple[str, Position | None]


def _order(position: Position | None) -> tuple[int, int]:
    """Where a position is in the walk, to compare two: primaries in slot order, and on each,
    SCAN's order, which visits hash buckets by the reversed bits of the cursor (so that a table
    resized in the middle of a walk is neither skipped nor, when it grows, read twice). Redis
    7.4 and later put a cluster node's hash slot in the cursor's low bits instead: there, only
    a batch split across a rehash may be read back wrongly."""
    if position is None:
        return _HASH_SLOTS, 0
    shard, scan_cursor = position
    return shard or 0, int(f"{scan_cursor:064b}"[::-1], 2)


def _first_slots(client: RedisCluster) -> list[int]:
    """The first hash slot each primary serves, in order: a primary's name in a listing cursor.

    A failover leaves it unchanged (the replica takes over the same slots), a node's address
    would not."""
    firsts: dict[str, int] = {}
    for slot, nodes in client.nodes_manager.slots_cache.items():
        name = nodes[0].name
        firsts[name] = min(slot, firsts.get(name, slot))
    return sorted(firsts.values())


def _encode_cursor(position: Position, split: Split | None = None) -> str:
    text = _encode_position(position)
    if split is not None:
        after, end = split
        text += f"/{after}/{'' if end is None else _encode_position(end)}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _encode_position(position: Position) -> str:
    shard, scan_cursor = position
    return f"{scan_cursor}" if shard is None else f"{shard}:{scan_cursor}"


def _decode_cursor(cursor: str | None) -> tuple[Position, Split | None]:
    if not cursor:
        return (None, 0), None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        head, *rest = text.split("/")
        position = _decode_position(head)
        if len(rest) < 2:
            # "position" or, from before splits carried their end, "position/name": that batch
            # is read whole again (a name may come twice, none is missed).
            if rest and rest[0] and not _VALID_NAME.match(rest[0]):
                raise ValueError(text)
            return position, None
        after, end = rest
        if not _VALID_NAME.match(after):
            raise ValueError(text)
        return position, (after, _decode_position(end) if end else None)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidInput("cursor: not a cursor returned by this service") from None


def _decode_position(head: str) -> Position:
    shard, _, scan_cursor = head.rpartition(":")
    if not scan_cursor.isdigit() or (shard and not (shard.isdigit() and int(shard) < _HASH_SLOTS)):
        raise ValueError(head)
    return int(shard) if shard else None, int(scan_cursor)
