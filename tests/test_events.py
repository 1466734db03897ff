"""Subscriptions over Server-Sent Events, through real service processes sharing one Redis."""

import asyncio
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from time import monotonic, sleep

import httpx
import pytest
import redis
from redis import asyncio as aioredis
from starlette.requests import ClientDisconnect
from starlette.types import Message

from app import events
from app.errors import StoreUnavailable
from app.events import Batch, EventHub, Lagged, Subscription, Update
from app.keys import KeyLayout
from app.models import Samples, StreamConfig, StreamState
from app.routes.events import _stream
from tests.redis_server import RedisServer, free_port
from tests.reference import ReferenceEma, exact_time_spread, z_score
from tests.service import ServiceProcess
from tests.utils import make_settings, running, subscribe


@pytest.fixture
def replicas(
    tmp_path: Path, redis_server: RedisServer, redis_client: "redis.Redis"
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    env = {"REDIS_URL": redis_server.url, "EMA_KEY_PREFIX": "test:", "EMA_WORKERS": "1"}
    with (
        ServiceProcess(
            tmp_path, **env, EMA_SSE_HEARTBEAT="0.2", EMA_MAX_SUBSCRIPTIONS="3"
        ) as first,
        ServiceProcess(tmp_path, **env) as second,
    ):
        yield first, second


def test_subscriber_gets_every_update_in_order_through_any_replica(
    replicas: tuple[ServiceProcess, ServiceProcess],
) -> None:
    first, second = replicas
    httpx.put(f"{first.url}/v1/streams/s", json={"decay": 0.9, "initial": 0})
    reference = ReferenceEma(0.9, 0.0)
    with subscribe(f"{first.url}/v1/streams/s/events") as events:
        for i in range(60):
            replica = (first, second)[i % 2]
            value = float(i * i % 17)
            reference.push(value)
            response = httpx.post(f"{replica.url}/v1/streams/s/values", json={"value": value})
            assert response.status_code == 200
        for i in range(60):
            kind, event_id, data = events.next()
            assert (kind, event_id, data["count"]) == ("update", str(i + 1), i + 1)
        assert data["value"] == reference.shadow
        assert data["last"] == 16.0 * 0 + float(59 * 59 % 17)
    # The spread and the arithmetic travel with the state.
    state = httpx.get(f"{second.url}/v1/streams/s").json()
    assert data["std"] == state["std"] > 0
    assert data["z"] == state["z"] is not None
    assert data["config"]["arithmetic"] == "float64"


def test_prefix_subscription_sees_only_matching_streams(
    replicas: tuple[ServiceProcess, ServiceProcess],
) -> None:
    first, second = replicas
    with subscribe(f"{first.url}/v1/events?prefix=cpu.") as events:
        for name in ("cpu.a", "mem.a", "cpu.b", "cpux"):
            httpx.post(f"{second.url}/v1/streams/{name}/values", json={"value": 1.0})
        names = [events.next()[2]["name"] for _ in range(2)]
    assert names == ["cpu.a", "cpu.b"]


def test_reconnect_with_last_event_id_replays_the_gap(
    replicas: tuple[ServiceProcess, ServiceProcess],
) -> None:
    first, second = replicas
    httpx.put(f"{first.url}/v1/streams/h", json={"decay": 0.5, "history": 100})
    push = f"{second.url}/v1/streams/h/values"
    with subscribe(f"{first.url}/v1/streams/h/events") as events:
        httpx.post(push, json={"values": [1.0, 2.0]})
        assert events.next()[1] == "2"
    httpx.post(push, json={"value": 3.0})
    httpx.post(push, json={"values": [4.0, 5.0]})
    with subscribe(f"{first.url}/v1/streams/h/events", {"Last-Event-ID": "2"}) as events:
        replayed = [events.next() for _ in range(3)]
        assert [(e[1], e[2]["last"]) for e in replayed] == [("3", 3.0), ("4", 4.0), ("5", 5.0)]
        httpx.post(push, json={"value": 6.0})
        kind, event_id, data = events.next()
        assert (kind, event_id, data["last"]) == ("update", "6", 6.0)


def test_reconnect_past_the_history_is_told_what_it_missed(
    replicas: tuple[ServiceProcess, ServiceProcess],
) -> None:
    first, _ = replicas
    httpx.put(f"{first.url}/v1/streams/h", json={"decay": 0.5, "history": 2})
    httpx.post(f"{first.url}/v1/streams/h/values", json={"values": [1.0, 2.0, 3.0, 4.0, 5.0]})
    with subscribe(f"{first.url}/v1/streams/h/events", {"Last-Event-ID": "1"}) as events:
        assert events.next() == ("lagged", None, {"missed": 2})
        assert [events.next()[1] for _ in range(2)] == ["4", "5"]


def test_idle_stream_sends_heartbeats(replicas: tuple[ServiceProcess, ServiceProcess]) -> None:
    first, _ = replicas
    with subscribe(f"{first.url}/v1/streams/quiet/events") as events:
        for line in events.lines:
            if line == ": keep-alive":
                break


def test_subscription_limit_gives_503(replicas: tuple[ServiceProcess, ServiceProcess]) -> None:
    first, _ = replicas
    url = f"{first.url}/v1/streams/s/events"
    with subscribe(url), subscribe(url), subscribe(url):
        refused = httpx.get(url)
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/problem+json"
        assert "subscription limit" in refused.json()["detail"]


def test_sigterm_ends_subscriptions_cleanly(
    replicas: tuple[ServiceProcess, ServiceProcess],
) -> None:
    first, _ = replicas
    with subscribe(f"{first.url}/v1/streams/s/events") as events:
        first.process.send_signal(signal.SIGTERM)
        assert events.next() == ("shutdown", None, {})
    assert first.process.wait(10) == 0


def state(count: int) -> Update:
    config = StreamConfig(decay=0.5)
    state = StreamState(
        name="s", value=1.0, debiased=1.0, count=count, last=1.0, decay_used=0.5,
        updated_at=0.0, config=config,
    )  # fmt: skip
    update = Update(state.name)
    update.count, update.data = state.count, state.model_dump_json().encode()
    return update


def batch(*counts: int) -> Batch:
    return Batch([state(count) for count in counts])


def test_slow_subscriber_is_told_how_many_updates_it_lost() -> None:
    subscription = Subscription("topic", is_pattern=False, queue_size=3)
    for count in range(1, 8):
        subscription.offer(batch(count))
    received = []
    while not subscription.updates.empty():
        item = subscription.updates.get_nowait()
        received.append(item if isinstance(item, Lagged) else item.lowest if item else None)
    # A full queue (3) becomes one Lagged counting what it held: at the 4th update the first 3
    # are dropped; at the 6th, that Lagged(3) and updates 4 and 5 become Lagged(5).
    assert received == [Lagged(5), 6, 7]
    subscription.offer(Lagged(None))
    subscription.offer(batch(8))
    subscription.offer(batch(9))
    subscription.offer(batch(10))
    assert subscription.updates.get_nowait() == Lagged(None)


def test_the_queue_bound_counts_the_updates_of_each_batch() -> None:
    subscription = Subscription("topic", is_pattern=False, queue_size=4)
    subscription.offer(batch(1, 2, 3))
    subscription.offer(batch(4))
    subscription.offer(batch(5, 6))  # 6 updates held: over 4, the first 4 are lost
    assert subscription.updates.get_nowait() == Lagged(4)
    assert [update.count for update in subscription.updates.get_nowait().updates] == [5, 6]
    subscription.offer(batch(*range(7, 17)))  # a batch over the bound alone is kept whole
    assert subscription.updates.get_nowait().lowest == 7


@pytest.mark.anyio
async def test_a_waiting_subscriber_gets_its_heartbeat_and_then_what_comes() -> None:
    subscription = Subscription("topic", is_pattern=False, queue_size=3)
    assert await subscription.take(0.05) == []  # nothing came within 0.05 s: a heartbeat
    assert await subscription.take(0.05) == []  # and again
    first, second = batch(1), batch(2, 3)
    subscription.offer(first)
    assert await subscription.take(0.05) == [first]
    asyncio.get_running_loop().call_later(0.01, subscription.offer, second)
    assert await subscription.take(5) == [second]
    assert subscription.updates.held == 0


class Response:
    """A response as `ema.write_now` sees it: takes what is written while `open`."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.open = True

    def write_now(self, body: bytes) -> bool:
        if self.open:
            self.written.append(body)
        return self.open


async def waiting(subscription: Subscription) -> "asyncio.Task[list[Batch | Lagged | None]]":
    """The subscription's reader, waiting in `take` for what comes."""
    reader = asyncio.create_task(subscription.take(5))
    await asyncio.sleep(0)
    assert not reader.done()
    return reader


@pytest.mark.anyio
async def test_a_batch_goes_straight_to_the_response_of_a_waiting_reader() -> None:
    response, pattern_response = Response(), Response()
    subscription = Subscription("topic", False, 3, write_now=response.write_now)
    pattern = Subscription("topic*", True, 3, write_now=pattern_response.write_now)
    readers = [await waiting(subscription), await waiting(pattern)]
    first, second = batch(1, 2), batch(3)
    for item in (first, second):
        subscription.deliver(item, 0.0)
        pattern.deliver(item, 0.0)
    # Written as the reader would write them (with ids for a stream's subscriber, without for
    # a prefix's), by the hub; the readers still wait, with nothing queued.
    assert response.written == [first.events_with_ids, second.events_with_ids]
    assert pattern_response.written == [first.events, second.events]
    assert subscription.updates.empty()
    assert pattern.updates.empty()
    await asyncio.sleep(0.01)
    assert not any(reader.done() for reader in readers)
    for reader in readers:
        reader.cancel()


@pytest.mark.anyio
async def test_what_a_response_does_not_take_goes_through_the_reader_in_order() -> None:
    response = Response()
    subscription = Subscription("topic", False, 10, write_now=response.write_now)
    reader = await waiting(subscription)
    response.open = False  # over its high-water mark, say
    first, second = batch(1), batch(2)
    subscription.deliver(first, 0.0)
    response.open = True
    subscription.deliver(second, 0.0)  # after `first`: queued behind it, not written
    assert response.written == []
    assert await reader == [first, second]


@pytest.mark.anyio
async def test_a_response_that_fails_to_write_leaves_its_batches_to_the_reader(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(body: bytes) -> bool:
        raise AttributeError("a server that changed under us")

    subscription = Subscription("topic", False, 10, write_now=broken)
    reader = await waiting(subscription)
    first = batch(1)
    subscription.deliver(first, 0.0)  # raises nothing: the reader gets it
    assert await reader == [first]
    assert subscription.write_now is None  # and writes every batch from now on
    assert "could not be written at once" in caplog.text


@pytest.mark.anyio
async def test_a_busy_reader_gets_its_batches_queued() -> None:
    response = Response()
    subscription = Subscription("topic", False, 10, write_now=response.write_now)
    subscription.deliver(batch(1), 0.0)  # nobody waits in take: the reader is writing
    assert response.written == []
    assert [item.lowest for item in await subscription.take(5)] == [1]  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_updates_already_replayed_go_through_the_reader() -> None:
    # The reader drops what it replayed from the history; the hub does not know which.
    response = Response()
    subscription = Subscription("topic", False, 10, write_now=response.write_now)
    subscription.replayed = 5
    reader = await waiting(subscription)
    subscription.deliver(batch(5, 6), 0.0)
    assert response.written == []
    assert [item.lowest for item in await reader] == [5]  # type: ignore[union-attr]
    reader = await waiting(subscription)
    subscription.deliver(batch(7), 0.0)
    assert response.written == [batch(7).events_with_ids]
    reader.cancel()


@pytest.mark.anyio
async def test_the_subscribers_of_a_stream_share_its_batches(
    redis_server: RedisServer, redis_client: "redis.Redis"
) -> None:
    async with running(make_settings(redis_server.url)) as (app, http):
        hub: EventHub = app.state.hub
        async with hub.subscribe(name="a") as first, hub.subscribe(name="a") as second:
            await asyncio.wait_for(first.ready.wait(), 5)
            pushes = [http.post("/v1/streams/a/values", json={"value": 1.0}) for _ in range(20)]
            await asyncio.gather(*pushes)
            batches: list[list[Batch]] = [[], []]
            while sum(len(b.updates) for b in batches[0]) < 20:
                for taken, subscription in zip(batches, (first, second), strict=True):
                    items = await subscription.take(5)
                    assert all(isinstance(item, Batch) for item in items)
                    taken += items  # type: ignore[arg-type]
    # The very same batches (joined once), every update in order, in fewer writes than updates.
    assert [id(b) for b in batches[0]] == [id(b) for b in batches[1]]
    assert [u.count for b in batches[0] for u in b.updates] == list(range(1, 21))
    assert len(batches[0]) < 20
    assert batches[0][-1].events_with_ids == b"".join(
        b"id: %d\nevent: update\ndata: %s\n\n" % (u.count, u.data) for u in batches[0][-1].updates
    )


@pytest.mark.anyio
async def test_an_update_this_process_pushed_is_not_rendered_again(
    redis_server: RedisServer, redis_client: "redis.Redis", monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch waits this long after the one before: the replies are in by then. (The first
    # update after a quiet spell goes at once, and may be heard before its reply arrives.)
    monkeypatch.setattr(events, "WRITE_INTERVAL", 2.0)
    async with running(make_settings(redis_server.url)) as (app, _):
        hub: EventHub = app.state.hub
        store = app.state.store
        await store.push_state("a", Samples((1.0,)))
        assert len(store.replies) == 0  # nobody listens: nothing kept
        async with hub.subscribe(name="a") as subscription:
            await asyncio.wait_for(subscription.ready.wait(), 5)
            replies = [(await store.push_state("a", Samples((v,))))[0] for v in (2.0, 3.0, 4.0)]
            updates: list[Update] = []
            while len(updates) < 3:
                for item in await subscription.take(5):
                    assert isinstance(item, Batch)
                    updates += item.updates
        assert len(store.replies) == 0  # taken by the hub, or dropped with the last subscriber
    assert [u.data for u in updates] == replies
    assert [u.count for u in updates] == [2, 3, 4]
    # The replies' very bytes, taken, not rendered again (the first went at once).
    assert all(u.data is reply for u, reply in zip(updates[1:], replies[1:], strict=True))


@pytest.mark.anyio
async def test_the_hub_hears_over_resp2(
    redis_server: RedisServer, redis_client: "redis.Redis"
) -> None:
    # RESP3 would deliver each message as a push reply, which redis-py formats for a debug log.
    async with (
        running(make_settings(redis_server.url)) as (app, _),
        app.state.hub.subscribe(name="a") as subscription,
    ):
        await asyncio.wait_for(subscription.ready.wait(), 5)
        clients = redis_client.client_list()
    subscribers = [c for c in clients if c["sub"] == "1"]
    assert [c["resp"] for c in subscribers] == ["2"]


def test_put_resets_a_resumed_subscription(
    replicas: tuple[ServiceProcess, ServiceProcess],
) -> None:
    first, second = replicas
    url = f"{second.url}/v1/streams/r"
    httpx.put(url, json={"decay": 0.5, "history": 100})
    httpx.post(f"{url}/values", json={"values": [1.0, 2.0, 3.0, 4.0, 5.0]})
    with subscribe(f"{first.url}/v1/streams/r/events", {"Last-Event-ID": "2"}) as events:
        assert [events.next()[1] for _ in range(3)] == ["3", "4", "5"]
        httpx.put(url, json={"decay": 0.5, "history": 100})
        kind, event_id, data = events.next()
        assert (kind, event_id, data["count"], data["value"]) == ("update", "0", 0, None)
        # The counts start over: 1 and 2 were replayed before the reset, and are new now.
        httpx.post(f"{url}/values", json={"value": 7.0})
        httpx.post(f"{url}/values", json={"value": 8.0})
        assert [(e[1], e[2]["last"]) for e in (events.next(), events.next())] == [
            ("1", 7.0),
            ("2", 8.0),
        ]
    # Resuming from an id of the stream before its reset replays all of the new one.
    with subscribe(f"{first.url}/v1/streams/r/events", {"Last-Event-ID": "5"}) as events:
        assert [(e[1], e[2]["last"]) for e in (events.next(), events.next())] == [
            ("1", 7.0),
            ("2", 8.0),
        ]


def test_replayed_events_carry_the_sample_time_as_the_history_does(
    replicas: tuple[ServiceProcess, ServiceProcess],
) -> None:
    first, _ = replicas
    url = f"{first.url}/v1/streams/t"
    httpx.put(url, json={"halflife": 10, "history": 10})
    values, times = [2.0, 7.5, -1.25, 4.0], [1000.25, 1003.0, 1003.5, 1011.0]
    for value, time in zip(values, times, strict=True):
        live = httpx.post(f"{url}/values", json={"value": value, "timestamp": time}).json()
    assert live["timestamp"] == 1011.0
    assert live["updated_at"] > 1_700_000_000  # the server's clock, not the sample's
    entries = httpx.get(f"{url}/history").json()["entries"]
    assert [entry["time"] for entry in entries] == times
    with subscribe(f"{url}/events", {"Last-Event-ID": "0"}) as events:
        replayed = [events.next() for _ in values]
    assert [(kind, event_id) for kind, event_id, _ in replayed] == [
        ("update", str(n)) for n in range(1, 5)
    ]
    for n, (_, _, data) in enumerate(replayed, 1):
        # The spread of the samples so far, and the z of each against the spread before it:
        # computed from the weights themselves (tests/reference.py), not by the service.
        spread = exact_time_spread(values[:n], times[:n], 10.0)
        before = exact_time_spread(values[: n - 1], times[: n - 1], 10.0) if n > 1 else None
        z = z_score(values[n - 1], before)
        assert data.keys() == {
            "name", "count", "value", "last", "timestamp", "std", "z", "replayed"
        }  # fmt: skip
        assert (data["name"], data["count"], data["last"]) == ("t", n, values[n - 1])
        assert (data["timestamp"], data["replayed"]) == (times[n - 1], True)
        assert data["value"] == entries[n - 1]["value"]
        assert close(data["std"], spread.std)
        assert close(data["z"], z, rel=1e-9)
        # What the history keeps, the replay carries.
        assert (data["std"], data["z"]) == (entries[n - 1]["std"], entries[n - 1]["z"])
    assert live["std"] == replayed[-1][2]["std"] is not None
    assert live["z"] == replayed[-1][2]["z"] is not None
    assert replayed[0][2]["std"] is None  # one sample has no spread


def close(a: float | None, b: float | None, rel: float = 1e-12) -> bool:
    if a is None or b is None:
        return a is b
    return a == pytest.approx(b, rel=rel, abs=0)


@pytest.mark.anyio
async def test_the_subscription_cap_is_a_503_before_the_response_starts(
    redis_server: RedisServer,
) -> None:
    # Two requests' handlers run before either's body starts: the second must be refused by
    # its handler (a 503), not find the hub full once its 200 is sent.
    client = aioredis.Redis.from_url(redis_server.url)
    hub = EventHub(client, KeyLayout("test:"), queue_size=10, max_subscriptions=1)
    try:
        first = _stream(hub, 1.0, name="a")
        with pytest.raises(StoreUnavailable, match="subscription limit"):
            _stream(hub, 1.0, name="b")
        assert hub.count == 1
        with pytest.raises(ClientDisconnect):
            await first({"type": "http", "asgi": {"spec_version": "2.4"}}, _never, _closed)
        assert hub.count == 0  # released when its response ended
    finally:
        await client.aclose()


async def _never() -> Message:
    raise AssertionError("not read")


async def _closed(message: Message) -> None:
    raise OSError("the client went away")


def test_a_subscriber_that_stops_reading_is_told_what_it_lost_and_pushes_go_on(
    tmp_path: Path, redis_server: RedisServer, redis_client: "redis.Redis"
) -> None:
    pushes = 10_000
    env = {"REDIS_URL": redis_server.url, "EMA_KEY_PREFIX": "test:", "EMA_WORKERS": "1"}
    with (
        ServiceProcess(tmp_path, **env, EMA_SUBSCRIBER_QUEUE="10") as service,
        socket.socket() as sock,
    ):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
        sock.settimeout(10)
        sock.connect(("127.0.0.1", service.port))
        sock.sendall(b"GET /v1/streams/slow/events HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b": subscribed" not in received:
            received += sock.recv(65536)
        # It reads nothing more: what the kernel and the transport do not hold is queued for
        # it, up to 10 updates, and the pushes are answered all the same.
        with httpx.Client(base_url=service.url, timeout=30) as http:
            for _ in range(pushes // 1000):  # each entry is a push of its own, announced
                entries = [{"stream": "slow", "value": i} for i in range(1000)]
                response = http.post("/v1/values", json={"entries": entries})
                assert response.status_code == 200
        while f"id: {pushes}\n".encode() not in received:
            received += sock.recv(65536)
    ids = [int(i) for i in re.findall(rb"^id: (\d+)$", received, re.MULTILINE)]
    missed = [int(m) for m in re.findall(rb'^data: {"missed": (\d+)}$', received, re.MULTILINE)]
    assert missed  # told, with how many
    assert ids == sorted(set(ids))
    assert len(ids) + sum(missed) == pushes  # every update either arrived or was counted lost


@pytest.mark.anyio
async def test_the_hub_reconnects_when_its_connection_is_killed(
    redis_server: RedisServer, redis_client: "redis.Redis"
) -> None:
    async with running(make_settings(redis_server.url)) as (app, _):
        store = app.state.store
        async with app.state.hub.subscribe(name="a") as subscription:
            await asyncio.wait_for(subscription.ready.wait(), 5)
            await store.push_state("a", Samples((1.0,)))
            assert [type(item) for item in await subscription.take(5)] == [Batch]
            assert redis_client.client_kill_filter(_type="pubsub") == 1
            # Told that updates may have been lost, then hearing them again once resubscribed.
            assert await subscription.take(5) == [Lagged(None)]
            await asyncio.to_thread(_wait_subscribed, redis_client)
            await store.push_state("a", Samples((2.0,)))
            (batch,) = await subscription.take(5)
            assert isinstance(batch, Batch)
            assert [update.count for update in batch.updates] == [2]


@pytest.mark.anyio
async def test_a_refused_subscription_is_retried_until_allowed(
    redis_server: RedisServer, redis_client: "redis.Redis"
) -> None:
    # A user who may run commands but not subscribe (Redis 7 denies channels by default).
    redis_client.acl_setuser(
        "no-channels",
        enabled=True,
        passwords=["+pw"],
        keys=["*"],
        commands=["+@all"],
        reset_channels=True,
    )
    url = redis_server.url.replace("redis://", "redis://no-channels:pw@")
    try:
        async with (
            running(make_settings(url)) as (app, _),
            app.state.hub.subscribe(name="a") as subscription,
        ):
            # NOPERM: no confirmation, and the hub keeps trying.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(subscription.ready.wait(), 1.5)
            redis_client.acl_setuser("no-channels", enabled=True, channels=["*"])
            await asyncio.wait_for(subscription.ready.wait(), 5)
            await app.state.store.push_state("a", Samples((1.0,)))
            # Each refusal told the subscriber it may have missed updates.
            items: list[Batch | Lagged | None] = []
            while not items or not isinstance(items[-1], Batch):
                items += await subscription.take(5)
            assert items[:-1] == [Lagged(None)] * (len(items) - 1)
            assert isinstance(items[-1], Batch)
            assert [update.count for update in items[-1].updates] == [1]
    finally:
        redis_client.acl_deluser("no-channels")


def _wait_subscribed(client: "redis.Redis", timeout: float = 5) -> None:
    """Until a client is subscribed to a channel."""
    deadline = monotonic() + timeout
    while not any(c["sub"] == "1" for c in client.client_list()):
        assert monotonic() < deadline, "nobody subscribed"
        sleep(0.05)


def test_the_hub_hears_over_tls(tmp_path: Path) -> None:
    """The service on a Redis it reaches over TLS (a `rediss://` URL): pushes, and the hub,
    whose protocol takes over the TLS connection redis-py made."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    tls_port = free_port()
    server = RedisServer(
        tmp_path / "redis",
        *("--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)),
        *("--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"),
    ).start()
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
        with (
            ServiceProcess(tmp_path, REDIS_URL=url, EMA_WORKERS="1") as service,
            subscribe(f"{service.url}/v1/streams/s/events") as events,
            server.client() as plain,  # on the server's plain port, for a look
        ):
            pushed = httpx.post(f"{service.url}/v1/streams/s/values", json={"value": 2.5})
            assert pushed.status_code == 200
            assert events.next() == ("update", "1", pushed.json())
            # The hub's connection is one of those on the TLS port.
            subscribers = [c for c in plain.client_list() if c["sub"] == "1"]
            assert [c["laddr"] for c in subscribers] == [f"127.0.0.1:{tls_port}"]
    finally:
        server.stop()
