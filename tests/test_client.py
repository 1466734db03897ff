"""The Python client against the real service, `python -m app` in a subprocess: every call,
sync and async, the error types, retries (and the pushes that must not be retried) across
connections dropped by a loopback proxy, API keys, connection reuse and subscriptions.

Tests of endpoints the service does not have yet are skipped on its OpenAPI schema, so they
run by themselves once the endpoint lands.
"""

import dataclasses
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ema_client import (
    ApiError,
    AsyncClient,
    Client,
    ConfigurationError,
    Forbidden,
    InvalidInput,
    InvalidReply,
    Lagged,
    NotFound,
    NotSupported,
    Page,
    PayloadTooLarge,
    Problem,
    Sample,
    ServiceUnavailable,
    State,
    StreamConfig,
    TransportError,
    Unauthorized,
    Update,
    error_for,
)

from app import models
from app.auth import ApiKey, hash_key
from tests.redis_server import RedisServer, free_port
from tests.reference import ReferenceEma
from tests.service import ServiceProcess
from tests.utils import (
    FAST,
    FEATURES,
    Proxy,
    needs_api_keys,
    needs_bulk,
    needs_events,
    needs_idempotency,
)


def own_prefix(redis_url: str) -> dict[str, str]:
    """One worker on `redis_url`, under a key prefix of its own."""
    return {
        "REDIS_URL": redis_url,
        "EMA_KEY_PREFIX": f"t{uuid.uuid4().hex[:8]}:",
        "EMA_WORKERS": "1",
    }


@pytest.fixture(scope="module")
def service(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    with ServiceProcess(
        tmp_path_factory.mktemp("service"),
        **own_prefix(redis_server.url),
        EMA_MAX_BODY_BYTES="4096",
    ) as running:
        yield running


@pytest.fixture(scope="module")
def service_without_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A service whose Redis is not there: every call that needs it is a 503."""
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    with ServiceProcess(
        tmp_path_factory.mktemp("no-redis"), ready="/healthz", **own_prefix(nowhere)
    ) as running:
        yield running


@pytest.fixture
def name() -> str:
    """A stream name no other test uses."""
    return f"t.{uuid.uuid4().hex[:12]}"


@pytest.fixture
def ema(service: ServiceProcess) -> Iterator[Client]:
    with Client(service.url, retry=FAST) as client:
        yield client


@pytest.fixture
def proxy(service: ServiceProcess) -> Iterator[Proxy]:
    running = Proxy(service.port)
    yield running
    running.close()


# --- every call -------------------------------------------------------------------------------


def test_the_worked_example_through_every_call(ema: Client, name: str) -> None:
    created = ema.create(name, decay=0.99, initial=0)
    assert isinstance(created, State)
    assert (created.name, created.value, created.count) == (name, 0.0, 0)
    assert (created.config.decay, created.config.initial) == (0.99, 0.0)

    assert ema.push(name, 5, num_updates=0).value == 4.5
    assert ema.push(name, 10, num_updates=10000).value == 4.555
    state = ema.push_many(name, [Sample(value=10, num_updates=10000)])
    assert (state.value, state.count, state.last, state.decay_used) == (4.60945, 3, 10.0, 0.99)
    assert ema.get(name) == state

    ema.delete(name)
    with pytest.raises(NotFound):
        ema.get(name)


def test_push_many_applies_numbers_and_samples_in_order(ema: Client, name: str) -> None:
    values: list[float | Sample] = [1.5, Sample(value=10, num_updates=7), -2, 3.25]
    reference = ReferenceEma(decay=0.99)
    for item in values:
        if isinstance(item, Sample):
            reference.push(item.value, item.num_updates)
        else:
            reference.push(float(item))
    state = ema.push_many(name, values)
    assert (state.value, state.debiased, state.count) == (
        reference.shadow,
        reference.debiased,
        reference.count,
    )


def test_create_replaces_and_resets(ema: Client, name: str) -> None:
    ema.push(name, 100)
    replaced = ema.create(name, decay=0.5, auto_num_updates=True)
    assert (replaced.value, replaced.count, replaced.config.auto_num_updates) == (None, 0, True)


def test_list_streams_follows_every_page(ema: Client, name: str) -> None:
    names = {f"{name}.{i}" for i in range(7)}
    for stream in names:
        ema.push(stream, 1)
    ema.push(f"other{name}", 1)
    listed = list(ema.list_streams(f"{name}.", page_size=2))
    assert sorted(listed) == sorted(names)  # each once, however SCAN pages them
    page = ema.list_page(f"{name}.", limit=1000)
    assert sorted(page.streams) == sorted(names)
    assert page.next_cursor is None


@pytest.mark.anyio
async def test_async_client_makes_every_call(service: ServiceProcess, name: str) -> None:
    async with AsyncClient(service.url, retry=FAST) as ema:
        assert (await ema.create(name, decay=0.99, initial=0)).count == 0
        assert (await ema.push(name, 5, num_updates=0)).value == 4.5
        state = await ema.push_many(name, [Sample(value=10, num_updates=10000), 10])
        assert (state.value, state.count) == (4.60945, 3)
        assert await ema.get(name) == state
        assert [n async for n in ema.list_streams(name, page_size=1)] == [name]
        assert (await ema.list_page(name)).streams == [name]
        assert await ema.features() == FEATURES
        await ema.delete(name)
        with pytest.raises(NotFound):
            await ema.delete(name)


def fields_of(model: type[object]) -> set[str]:
    """A client model's fields, but the `extra` every reply has for a newer service's."""
    return {item.name for item in dataclasses.fields(model)} - {"extra"}  # type: ignore[arg-type]


def test_reply_models_mirror_the_service_models() -> None:
    assert fields_of(State) == set(models.StreamState.model_fields)
    assert fields_of(StreamConfig) == set(models.StreamConfig.model_fields)
    assert fields_of(Page) == set(models.StreamPage.model_fields)
    assert fields_of(Problem) == set(models.Problem.model_fields)
    assert fields_of(Sample) == set(models.Sample.model_fields)


def test_replies_keep_fields_newer_than_the_client(ema: Client, name: str) -> None:
    state = ema.push(name, 1)
    assert state.to_dict()["config"].keys() >= {"decay", "initial", "auto_num_updates"}
    newer = State.parse({**state.to_dict(), "novel": 1})
    assert (newer.extra, newer.novel, newer.to_dict()["novel"]) == ({"novel": 1}, 1, 1)
    assert newer.to_dict() == {**state.to_dict(), "novel": 1}


def test_a_reply_of_another_shape_is_a_protocol_error(name: str) -> None:
    with pytest.raises(InvalidReply, match=r"State\.count: expected int, got str"):
        State.parse({"name": name, "value": 1.5, "count": "2", "config": {"decay": 0.5}})
    with pytest.raises(InvalidReply, match=r"State\.config: missing"):
        State.parse({"name": name, "value": None, "count": 0})
    with pytest.raises(InvalidReply, match=r"Page\.streams\[1\]: expected str, got int"):
        Page.parse({"streams": ["a", 2]})


def test_features_are_read_from_the_service(ema: Client) -> None:
    assert ema.features() == FEATURES


# --- errors -----------------------------------------------------------------------------------


def test_errors_carry_the_problem_details(ema: Client, name: str) -> None:
    with pytest.raises(NotFound) as missing:
        ema.delete(name)
    problem = missing.value.problem
    assert (problem.status, problem.title) == (404, "Not Found")
    assert name in problem.detail
    assert problem.instance == f"/v1/streams/{name}"
    assert missing.value.status == 404

    with pytest.raises(InvalidInput) as invalid:
        ema.create(name, decay=2)
    assert invalid.value.errors is not None
    assert invalid.value.errors[0]["loc"] == ["body", "decay"]

    with pytest.raises(InvalidInput, match="finite"):
        ema.push(name, float("nan"))
    with pytest.raises(InvalidInput):
        ema.get("no spaces")
    with pytest.raises(InvalidInput):
        ema.list_page(limit=0)
    with pytest.raises(PayloadTooLarge):  # the test service takes 4 KiB bodies
        ema.push_many(name, [1.0] * 1000)
    with pytest.raises(NotFound):
        ema.get(name)  # none of the rejected pushes created it


def test_a_name_cannot_escape_its_path(ema: Client) -> None:
    with pytest.raises(ApiError) as error:
        ema.get("../../healthz")
    assert error.value.status in (404, 422)


def test_status_codes_map_to_error_types() -> None:
    # The types for statuses the running service cannot be made to send yet (keys come later).
    def answer(status: int, body: bytes, **headers: str) -> ApiError:
        response = httpx.Response(status, content=body, headers=headers)
        return error_for(response)

    problem = b'{"type":"about:blank","title":"Unauthorized","status":401,"detail":"no API key"}'
    unauthorized = answer(401, problem, **{"content-type": "application/problem+json"})
    assert isinstance(unauthorized, Unauthorized)
    assert unauthorized.detail == "no API key"
    assert isinstance(answer(403, b'{"title":"Forbidden","status":403,"detail":"x"}'), Forbidden)
    unavailable = answer(503, b"<html>Bad Gateway</html>", **{"retry-after": "7"})
    assert isinstance(unavailable, ServiceUnavailable)
    assert (unavailable.status, unavailable.detail, unavailable.retry_after) == (
        503,
        "<html>Bad Gateway</html>",
        7.0,
    )
    assert type(answer(418, b"")) is ApiError


def test_a_bad_url_or_key_is_refused_before_anything_is_sent() -> None:
    assert Client("127.0.0.1:8000").url == "http://127.0.0.1:8000"
    assert Client("https://ema.example/base/").url == "https://ema.example/base"
    for url in ("ftp://ema.example", "http://", "localhost:port"):
        with pytest.raises(ConfigurationError, match="invalid service URL"):
            Client(url)
    with pytest.raises(ConfigurationError, match="API key"):
        Client("127.0.0.1:8000", api_key="line\nbreak")


def test_an_unreachable_service_is_a_transport_error() -> None:
    with Client(f"http://127.0.0.1:{free_port()}", retry=FAST) as ema:
        with pytest.raises(TransportError, match="cannot connect") as error:
            ema.get("cpu")
        assert not error.value.maybe_applied
        with pytest.raises(TransportError) as error:
            ema.push("cpu", 1)
        assert not error.value.maybe_applied  # never connected: nothing was sent


def test_503_is_retried_for_idempotent_calls_with_its_details(
    service_without_redis: ServiceProcess,
) -> None:
    proxy = Proxy(service_without_redis.port)
    try:
        with Client(proxy.url, retry=FAST) as ema:
            with pytest.raises(ServiceUnavailable) as error:
                ema.get("cpu")
            assert error.value.retry_after == 1.0
            assert "Redis" in error.value.detail
            assert len(proxy.requests()) == FAST.attempts

            with pytest.raises(ServiceUnavailable):
                ema.push("cpu", 1)  # a 503 push may have been applied: never retried
            assert len(proxy.requests()) == FAST.attempts + 1
    finally:
        proxy.close()


# --- retries across dropped connections -------------------------------------------------------


def test_an_unkeyed_push_is_never_retried(ema: Client, proxy: Proxy, name: str) -> None:
    proxy.drop_responses = 1
    with (
        Client(proxy.url, retry=FAST) as through_proxy,
        pytest.raises(TransportError, match="may have been applied") as error,
    ):
        through_proxy.push(name, 5)
    assert error.value.maybe_applied
    assert [(m, p) for m, p, _ in proxy.requests()] == [("POST", f"/v1/streams/{name}/values")]
    assert ema.get(name).count == 1  # the service applied it; the client did not repeat it


def test_idempotent_calls_are_retried_after_a_dropped_connection(
    ema: Client, proxy: Proxy, name: str
) -> None:
    ema.push(name, 5)
    proxy.drop_responses = 1
    with Client(proxy.url, retry=FAST) as through_proxy:
        assert through_proxy.get(name).count == 1
    assert [m for m, _, _ in proxy.requests()] == ["GET", "GET"]
    assert proxy.connections == 2


@needs_idempotency
def test_a_keyed_push_is_retried_and_applied_exactly_once(
    ema: Client, proxy: Proxy, name: str
) -> None:
    proxy.drop_responses = 1
    with Client(proxy.url, retry=FAST) as through_proxy:
        state = through_proxy.push(name, 5, idempotent=True)
    assert state.count == 1
    sent = proxy.requests()
    assert [m for m, _, _ in sent] == ["POST", "POST"]
    keys = {headers["idempotency-key"] for _, _, headers in sent}
    assert len(keys) == 1
    assert uuid.UUID(keys.pop()).version == 4
    assert ema.get(name).count == 1


@needs_idempotency
@pytest.mark.anyio
async def test_an_async_keyed_push_of_many_is_retried_and_applied_once(
    ema: Client, proxy: Proxy, name: str
) -> None:
    proxy.drop_responses = 1
    async with AsyncClient(proxy.url, retry=FAST) as through_proxy:
        state = await through_proxy.push_many(name, [1, 2, 3], idempotency_key="step-41")
    assert state.count == 3
    assert [h["idempotency-key"] for _, _, h in proxy.requests()] == ["step-41", "step-41"]
    assert ema.get(name).count == 3


@needs_idempotency
def test_a_key_reused_for_another_push_is_refused(ema: Client, name: str) -> None:
    ema.push(name, 1, idempotency_key="once")
    assert ema.push(name, 1, idempotency_key="once").count == 1
    with pytest.raises(InvalidInput, match="Idempotency-Key"):
        ema.push(name, 2, idempotency_key="once")


# --- connections and keys ---------------------------------------------------------------------


def test_one_connection_serves_every_call(proxy: Proxy, name: str) -> None:
    with Client(proxy.url, retry=FAST) as ema:
        ema.push(name, 1)
        ema.get(name)
        list(ema.list_streams(name))
        ema.delete(name)
    assert len(proxy.requests()) == 4
    assert proxy.connections == 1


@pytest.mark.anyio
async def test_async_client_reuses_its_connection(proxy: Proxy, name: str) -> None:
    async with AsyncClient(proxy.url, retry=FAST) as ema:
        for value in range(5):
            await ema.push(name, value)
    assert proxy.connections == 1


def test_api_key_is_sent_as_a_bearer_token(
    proxy: Proxy, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Client(proxy.url, api_key="k-123", retry=FAST) as ema:
        ema.push(name, 1)
    monkeypatch.setenv("EMA_API_KEY", "from-env")
    monkeypatch.setenv("EMA_URL", proxy.url)
    with Client(retry=FAST) as ema:
        ema.get(name)
    with Client(retry=FAST) as ema:
        ema.get(name)
    sent = [headers.get("authorization") for _, _, headers in proxy.requests()]
    assert sent == ["Bearer k-123", "Bearer from-env", "Bearer from-env"]


@needs_api_keys
def test_keys_are_sent_and_checked(redis_server: RedisServer, tmp_path: Path, name: str) -> None:
    keys = [
        ApiKey(name="admin", sha256=hash_key("secret-admin"), scopes=frozenset({"admin"})),
        ApiKey(
            name="cpu",
            sha256=hash_key("secret-cpu"),
            scopes=frozenset({"read", "write"}),
            prefixes=("cpu.",),
        ),
    ]
    configured = json.dumps([key.model_dump(mode="json") for key in keys])
    with ServiceProcess(
        tmp_path, **own_prefix(redis_server.url), EMA_API_KEYS=configured
    ) as service:
        with Client(service.url, retry=FAST) as anonymous:
            assert anonymous.features() == FEATURES  # the schema is public
            with pytest.raises(Unauthorized) as missing:
                anonymous.get(name)
        assert missing.value.problem.status == 401
        with (
            Client(service.url, api_key="wrong", retry=FAST) as wrong,
            pytest.raises(Unauthorized),
        ):
            wrong.push(name, 1)
        with Client(service.url, api_key="secret-cpu", retry=FAST) as scoped:
            assert scoped.push(f"cpu.{name}", 1).count == 1
            with pytest.raises(Forbidden) as outside:
                scoped.push(name, 1)
            assert outside.value.status == 403
            if FEATURES.events:  # the key goes on the event stream too
                with (
                    Pusher(service.url, f"cpu.{name}", api_key="secret-admin"),
                    scoped.subscribe(f"cpu.{name}", idle_timeout=3, max_reconnects=1) as events,
                ):
                    assert isinstance(next(events), Update)
        with Client(service.url, api_key="secret-admin", retry=FAST) as admin:
            assert admin.get(f"cpu.{name}").count >= 1
            with pytest.raises(NotFound):
                admin.get(name)  # the refused pushes applied nothing


# --- bulk -------------------------------------------------------------------------------------


@needs_bulk
def test_bulk_push_across_streams(ema: Client, name: str) -> None:
    results = ema.push_bulk({f"{name}.a": 1.5, f"{name}.b": [2, Sample(value=3, num_updates=1)]})
    assert [r.stream for r in results] == [f"{name}.a", f"{name}.b"]
    assert all(r.ok for r in results)
    assert [r.state.count for r in results if r.state] == [1, 2]
    assert ema.get(f"{name}.b").count == 2


@pytest.mark.skipif(FEATURES.bulk, reason="the service has the bulk endpoint")
def test_bulk_push_on_a_service_without_it_says_so(ema: Client, name: str) -> None:
    with pytest.raises(NotSupported, match="bulk"):
        ema.push_bulk({name: 1})


# --- subscriptions ----------------------------------------------------------------------------


class Pusher:
    """Pushes to a stream every few milliseconds in a thread until stopped."""

    def __init__(self, url: str, name: str, api_key: str | None = None) -> None:
        self.url = url
        self.name = name
        self.api_key = api_key
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with Client(self.url, api_key=self.api_key, retry=FAST) as ema:
            value = 0.0
            while not self.stopped.wait(0.02):
                value += 1
                ema.push(self.name, value)

    def __enter__(self) -> "Pusher":
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stopped.set()
        self.thread.join(5)


@needs_events
def test_subscribe_yields_updates(ema: Client, service: ServiceProcess, name: str) -> None:
    ema.create(name, decay=0.5, initial=0)
    updates: list[Update] = []
    with Pusher(service.url, name), ema.subscribe(name, idle_timeout=3, max_reconnects=1) as events:
        for event in events:
            if isinstance(event, Update):
                updates.append(event)
            if len(updates) == 3:
                break
    counts = [update.count for update in updates]
    assert counts == list(range(counts[0], counts[0] + 3))
    assert [update.id for update in updates] == [str(count) for count in counts]
    assert {update.name for update in updates} == {name}
    assert events.last_event_id == str(counts[-1])


@needs_events
def test_subscribe_reconnects_with_last_event_id(
    proxy: Proxy, service: ServiceProcess, name: str
) -> None:
    seen: list[Update | Lagged] = []
    with (
        Client(proxy.url, retry=FAST) as ema,
        Pusher(service.url, name),
        ema.subscribe(name, idle_timeout=3, max_reconnects=2) as events,
    ):
        for event in events:
            seen.append(event)
            if len(seen) == 2:
                proxy.cut()
            if len(seen) == 5:
                break
    requests = proxy.requests()
    assert len(requests) >= 2
    first_id = seen[1].id
    assert first_id is not None
    assert requests[1][2].get("last-event-id") == first_id
    after = [event for event in seen[2:] if isinstance(event, Update)]
    assert after
    assert all(update.count > int(first_id) for update in after)


@needs_events
def test_subscribe_from_an_id_replays_the_history(ema: Client, name: str) -> None:
    ema.create(name, decay=0.5, history=10)
    ema.push_many(name, [Sample(1.0, timestamp=1000.0), Sample(2.0, timestamp=1001.0)])
    ema.push_many(name, [Sample(3.0, timestamp=1002.0)])
    with ema.subscribe(name, last_event_id="1", idle_timeout=3, max_reconnects=0) as events:
        replayed = [next(iter(events)), next(iter(events))]
    assert all(isinstance(event, Update) and event.replayed for event in replayed)
    updates = [event for event in replayed if isinstance(event, Update)]
    assert [(u.count, u.last, u.timestamp) for u in updates] == [(2, 2.0, 1001.0), (3, 3.0, 1002.0)]


@needs_events
@pytest.mark.anyio
async def test_async_subscribe_yields_updates(service: ServiceProcess, name: str) -> None:
    async with AsyncClient(service.url, retry=FAST) as ema:
        with Pusher(service.url, name):
            async with ema.subscribe(name, idle_timeout=3, max_reconnects=1) as events:
                first = await anext(aiter(events))
                second = await anext(aiter(events))
    assert isinstance(first, Update)
    assert isinstance(second, Update)
    assert second.count > first.count


def test_create_takes_every_configuration_field(ema: Client, name: str) -> None:
    windows = [{"name": "1m", "halflife": 60.0}, {"name": "fast", "decay": 0.9}]
    state = ema.create(name, halflife=10.0, windows=windows, ttl=3600)
    assert (state.config.halflife, state.config.decay) == (10.0, None)
    pushed = ema.push_many(name, [Sample(2.0, timestamp=1000.0), Sample(4.0, timestamp=1010.0)])
    assert pushed.value == (2.0 * 0.5 + 4.0) / 1.5
    assert pushed.windows is not None
    assert set(pushed.windows) == {"1m", "fast"}
