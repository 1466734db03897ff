"""`GET /metrics`: the Prometheus exposition, read back with prometheus-client's own parsers."""

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from app import __version__
from app.main import create_app
from app.metrics import (
    MULTIPROC_DIR,
    REDIS_ERROR_KINDS,
    UNMATCHED,
    Metrics,
    RouteMatcher,
    multiprocess_directory,
    remove_multiprocess_directory,
)
from app.settings import Settings
from tests.redis_server import RedisServer, free_port
from tests.reference import ReferenceEma
from tests.service import ServiceProcess
from tests.utils import make_settings, serve

# The series the README documents (counters by family name, without `_total`).
DOCUMENTED = {
    "ema_http_requests": "counter",
    "ema_http_request_duration_seconds": "histogram",
    "ema_pushes": "counter",
    "ema_values_applied": "counter",
    "ema_redis_errors": "counter",
    "ema_script_duration_seconds": "histogram",
    "ema_subscriptions_open": "gauge",
    "ema_stream_value": "gauge",
    "ema_stream_debiased": "gauge",
    "ema_stream_std": "gauge",
    "ema_stream_z": "gauge",
    "ema_stream_last": "gauge",
    "ema_stream_updates": "counter",
    "ema_stream_window": "gauge",
    "ema_stream_updated_timestamp_seconds": "gauge",
    "ema_stream_info": "gauge",
    "ema_build_info": "gauge",
    "ema_metrics_streams": "gauge",
    "ema_metrics_streams_truncated": "gauge",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scrape:
    """One parsed exposition: family types, and every sample by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.samples: Samples = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[sample.name, frozenset(sample.labels.items())] = sample.value

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def labelled(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: value for (sample, labels), value in self.samples.items() if sample == name}


async def scrape(client: httpx.AsyncClient) -> Scrape:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape(response.text)


PUSH_ROUTE = "/v1/streams/{name}/values"


@pytest.mark.anyio
async def test_every_documented_family_is_exposed_with_its_type(
    redis_server: RedisServer, redis_client: "redis.Redis"
) -> None:
    settings = make_settings(redis_server.url, metrics_stream_prefixes="*")
    async for client in serve(settings):
        await client.post("/v1/streams/s/values", json={"value": 1})
        metrics = await scrape(client)
    assert {name: metrics.types.get(name) for name in DOCUMENTED} == DOCUMENTED


@pytest.mark.anyio
async def test_requests_are_counted_by_route_template_method_and_status(
    client: httpx.AsyncClient,
) -> None:
    # Through the fast path and through FastAPI's routing alike (the `client` fixture runs both).
    for name in ("a", "b", "c"):
        assert (await client.post(f"/v1/streams/{name}/values", json={"value": 1})).is_success
    assert (await client.post("/v1/streams/a/values", json={"value": "x"})).status_code == 422
    assert (await client.get("/v1/streams/b")).status_code == 200
    assert (await client.get("/no/such/route")).status_code == 404
    assert (await client.get("/v1/streams/a/b/c")).status_code == 404
    metrics = await scrape(client)
    requests = metrics.labelled("ema_http_requests_total")
    expected = {
        (PUSH_ROUTE, "POST", "200"): 3.0,
        (PUSH_ROUTE, "POST", "422"): 1.0,
        ("/v1/streams/{name}", "GET", "200"): 1.0,
        (UNMATCHED, "GET", "404"): 2.0,
    }
    found = {
        (dict(k)["route"], dict(k)["method"], dict(k)["status"]): v
        for k, v in requests.items()
        if v
    }
    # The scrape itself is counted once its response starts, so it is not in its own body.
    assert found == expected
    # Every API route's 5xx counters exist from the start, at zero.
    zeros = {(dict(k)["route"], dict(k)["method"], dict(k)["status"]) for k, v in requests.items()}
    for status in ("500", "503"):
        assert (PUSH_ROUTE, "POST", status) in zeros
        assert ("/v1/values", "POST", status) in zeros
        assert ("/v1/streams/{name}", "PUT", status) in zeros
    assert not any(route.startswith("/static") for route, _, _ in zeros)
    # The latency histogram has one observation per request, under the same labels.
    for (route, method, status), count in expected.items():
        labels = {"route": route, "method": method, "status": status}
        assert metrics.value("ema_http_request_duration_seconds_count", **labels) == count
        assert (
            metrics.value("ema_http_request_duration_seconds_bucket", le="+Inf", **labels) == count
        )
    assert not any("/v1/streams/a" in dict(k)["route"] for k in requests)  # no raw paths


@pytest.mark.anyio
async def test_pushes_values_and_script_calls_are_counted(client: httpx.AsyncClient) -> None:
    await client.post("/v1/streams/s/values", json={"value": 1})
    await client.post("/v1/streams/s/values", json={"values": [1, 2, 3, 4]})
    key = {"Idempotency-Key": "k1"}
    await client.post("/v1/streams/t/values", json={"value": 5}, headers=key)
    replay = await client.post("/v1/streams/t/values", json={"value": 5}, headers=key)
    assert replay.headers["idempotent-replayed"] == "true"
    # Refused by the script itself (the update would overflow): it ran, nothing was applied.
    overflow = await client.post("/v1/streams/o/values", json={"values": [-1.7e308, 1.7e308]})
    assert overflow.status_code == 422
    metrics = await scrape(client)
    assert metrics.value("ema_pushes_total") == 3  # the replay was not applied again
    assert metrics.value("ema_values_applied_total") == 1 + 4 + 1
    # Every call, the replay and the refused overflow included.
    assert metrics.value("ema_script_duration_seconds_count") == 5
    # Every kind of Redis error is there from the start, at zero.
    errors = {dict(k)["kind"]: v for k, v in metrics.labelled("ema_redis_errors_total").items()}
    assert errors == dict.fromkeys(REDIS_ERROR_KINDS, 0.0)
    assert len(REDIS_ERROR_KINDS) == 9


@pytest.mark.anyio
async def test_stream_values_for_the_chosen_prefixes(
    redis_server: RedisServer, redis_client: "redis.Redis"
) -> None:
    settings = make_settings(redis_server.url, metrics_stream_prefixes="cpu.,mem")
    references = {}
    async for client in serve(settings):
        for name, values in {
            "cpu.a": [1.0, 5.0],
            "cpu.b": [3.5],
            "mem": [10.0, 20.0, 40.0],
            "memory.x": [2.0],
            "disk": [7.0],
            "cpux": [1.0],
        }.items():
            await client.put(f"/v1/streams/{name}", json={"decay": 0.9, "initial": 0})
            references[name] = reference = ReferenceEma(0.9, 0.0)
            for value in values:
                reference.push(value)
                await client.post(f"/v1/streams/{name}/values", json={"value": value})
        await client.put("/v1/streams/cpu.fresh", json={"decay": 0.5})  # no value yet
        metrics = await scrape(client)
    exported = {"cpu.a", "cpu.b", "mem", "memory.x"}
    values = {dict(k)["stream"]: v for k, v in metrics.labelled("ema_stream_value").items()}
    assert values == {name: references[name].shadow for name in exported}
    debiased = {dict(k)["stream"]: v for k, v in metrics.labelled("ema_stream_debiased").items()}
    assert debiased == {name: references[name].debiased for name in exported}
    last = {dict(k)["stream"]: v for k, v in metrics.labelled("ema_stream_last").items()}
    assert last == {name: references[name].last for name in exported}
    updates = {
        dict(k)["stream"]: v for k, v in metrics.labelled("ema_stream_updates_total").items()
    }
    assert updates == {**{name: references[name].count for name in exported}, "cpu.fresh": 0}
    assert metrics.value("ema_metrics_streams") == 5
    assert metrics.value("ema_metrics_streams_truncated") == 0


@pytest.mark.anyio
async def test_every_kind_and_window_is_exported_with_what_it_is(
    redis_server: RedisServer, redis_client: "redis.Redis"
) -> None:
    settings = make_settings(redis_server.url, metrics_stream_prefixes="*")
    async for client in serve(settings):
        windows = [{"name": "1m", "halflife": 60}, {"name": "5m", "halflife": 300}]
        await client.put("/v1/streams/lat", json={"halflife": 10, "windows": windows})
        await client.put(
            "/v1/streams/req", json={"halflife": 60, "kind": "rate", "windows": windows}
        )
        await client.put(
            "/v1/streams/loss", json={"decay": 0.9, "windows": [{"name": "fast", "decay": 0.5}]}
        )
        for name, values in {"lat": [4.0, 8.0], "req": [3.0, 5.0], "loss": [1.0, 3.0]}.items():
            for x in values:
                assert (
                    await client.post(f"/v1/streams/{name}/values", json={"value": x})
                ).is_success
        states = {
            name: (await client.get(f"/v1/streams/{name}")).json()
            for name in ("lat", "req", "loss")
        }
        metrics = await scrape(client)

    def by_stream(family: str) -> dict[str, dict[str, str]]:
        return {dict(k)["stream"]: dict(k) for k in metrics.labelled(family)}

    kinds = {name: labels["kind"] for name, labels in by_stream("ema_stream_value").items()}
    assert kinds == {"lat": "mean", "req": "rate", "loss": "mean"}
    found = {
        (dict(k)["stream"], dict(k)["window"], dict(k)["kind"]): v
        for k, v in metrics.labelled("ema_stream_window").items()
    }
    assert set(found) == {
        ("lat", "1m", "mean"),
        ("lat", "5m", "mean"),
        ("req", "1m", "rate"),
        ("req", "5m", "rate"),
        ("loss", "fast", "mean"),
    }
    # Means are exact; a rate decays between the GET and the scrape, never up.
    assert found["lat", "1m", "mean"] == states["lat"]["windows"]["1m"]["value"]
    assert found["loss", "fast", "mean"] == states["loss"]["windows"]["fast"]["value"] == 2.0
    for window in ("1m", "5m"):
        assert 0 < found["req", window, "rate"] <= states["req"]["windows"][window]["value"]
    assert metrics.value("ema_stream_value", stream="loss", kind="mean") == states["loss"]["value"]
    rate = metrics.value("ema_stream_value", stream="req", kind="rate")
    assert rate is not None
    assert 0 < rate <= states["req"]["value"]
    assert metrics.value("ema_stream_last", stream="req", kind="rate") == 5.0
    for name, state in states.items():
        updated = metrics.value("ema_stream_updated_timestamp_seconds", stream=name)
        assert updated == state["updated_at"]
    info = by_stream("ema_stream_info")
    assert info["req"] == {
        "stream": "req",
        "kind": "rate",
        "decay": "",
        "halflife": "60.0",
        "windows": "1m=halflife 60.0s,5m=halflife 300.0s",
    }
    assert info["loss"]["decay"] == "0.9"
    assert info["loss"]["windows"] == "fast=decay 0.5"
    build = metrics.labelled("ema_build_info")
    assert [dict(k)["version"] for k, v in build.items() if v == 1] == [__version__]


@pytest.mark.anyio
async def test_the_cap_bounds_the_streams_exported_and_says_so(
    redis_server: RedisServer, redis_client: "redis.Redis"
) -> None:
    settings = make_settings(redis_server.url, metrics_stream_prefixes="*", metrics_max_streams=3)
    async for client in serve(settings):
        await client.post("/v1/streams/s0/values", json={"values": [1.0] * 2})
        metrics = await scrape(client)
        assert metrics.value("ema_metrics_streams_truncated") == 0
        assert len(metrics.labelled("ema_stream_value")) == 1
        for i in range(1, 40):
            await client.post(f"/v1/streams/s{i}/values", json={"value": float(i)})
        metrics = await scrape(client)
    streams = {dict(k)["stream"] for k in metrics.labelled("ema_stream_value")}
    assert len(streams) == 3
    assert streams <= {f"s{i}" for i in range(40)}
    assert metrics.value("ema_metrics_streams") == 3
    assert metrics.value("ema_metrics_streams_truncated") == 1


@pytest.mark.anyio
async def test_no_stream_values_unless_prefixes_are_configured(client: httpx.AsyncClient) -> None:
    await client.post("/v1/streams/s/values", json={"value": 1})
    metrics = await scrape(client)
    assert metrics.labelled("ema_stream_value") == {}
    assert metrics.value("ema_metrics_streams") == 0


@pytest.mark.anyio
async def test_openmetrics_when_asked_for(client: httpx.AsyncClient) -> None:
    await client.post("/v1/streams/s/values", json={"value": 1})
    response = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    families = {family.name: family for family in openmetrics_families(response.text)}
    assert families["ema_pushes"].type == "counter"
    assert [s.value for s in families["ema_pushes"].samples if s.name == "ema_pushes_total"] == [1]


@pytest.mark.anyio
async def test_scrape_answers_and_counts_errors_while_redis_is_down() -> None:
    settings = make_settings(f"redis://127.0.0.1:{free_port()}/0", metrics_stream_prefixes="*")
    async for client in serve(settings):
        assert (await client.post("/v1/streams/s/values", json={"value": 1})).status_code == 503
        metrics = await scrape(client)
    # The push and the scrape's own attempt to list the streams.
    assert metrics.value("ema_redis_errors_total", kind="connection") == 2
    assert metrics.value("ema_pushes_total") == 0
    assert metrics.value("ema_metrics_streams") == 0
    key = frozenset({"route": PUSH_ROUTE, "method": "POST", "status": "503"}.items())
    counted = metrics.labelled("ema_http_requests_total")
    assert {k: v for k, v in counted.items() if v} == {key: 1.0}


@pytest.fixture
def debug_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, "--enable-debug-command", "yes").start()
    yield server
    server.kill()


@pytest.mark.anyio
async def test_a_timed_out_push_counts_as_a_timeout(debug_redis: RedisServer) -> None:
    settings = make_settings(debug_redis.url, redis_timeout=0.2)
    async for client in serve(settings):
        await client.post("/v1/streams/s/values", json={"value": 1})  # connects, loads the script

        connected = threading.Event()

        def block_redis(connected: threading.Event) -> None:
            with debug_redis.client() as blocker:
                blocker.ping()
                connected.set()  # DEBUG SLEEP is a send away: the push below finds Redis asleep
                blocker.execute_command("DEBUG", "SLEEP", "1")

        sleeper = threading.Thread(target=block_redis, args=(connected,))
        sleeper.start()
        try:
            assert await anyio.to_thread.run_sync(connected.wait, 10)
            await anyio.sleep(0.1)
            assert (await client.post("/v1/streams/s/values", json={"value": 2})).status_code == 503
        finally:
            sleeper.join()
        metrics = await scrape(client)
    assert metrics.value("ema_redis_errors_total", kind="timeout") == 1
    assert metrics.value("ema_script_duration_seconds_count") == 2
    # The timed-out call took at least the timeout (0.2s): only the first is at or under 0.1s.
    assert metrics.value("ema_script_duration_seconds_bucket", le="0.1") == 1


def test_route_matcher_gives_templates_never_raw_paths(redis_server: RedisServer) -> None:
    from app.metrics import _flat_routes

    app = create_app(make_settings(redis_server.url))
    match = RouteMatcher(_flat_routes(app.routes))
    assert match("/v1/streams/cpu.a/values") == PUSH_ROUTE
    assert match("/v1/streams/cpu.a") == "/v1/streams/{name}"
    assert match("/v1/streams/x/history") == "/v1/streams/{name}/history"
    assert match("/v1/streams/x/events") == "/v1/streams/{name}/events"
    assert match("/v1/streams") == "/v1/streams"
    assert match("/metrics") == "/metrics"
    assert match("/") == "/"
    assert match("/static/vendor/x.js") == "/static/{path}"
    assert match("/v1/streams/a/b/values") == UNMATCHED
    assert match("/wp-admin.php") == UNMATCHED


@pytest.mark.parametrize("value", ["!", "cpu,a b", "{x}", "cpu*"])
def test_bad_stream_prefixes_are_refused(value: str) -> None:
    with pytest.raises(ValidationError, match="metrics_stream_prefixes"):
        Settings(metrics_stream_prefixes=value)


def test_star_means_every_stream_and_spaces_are_trimmed() -> None:
    settings = Settings(metrics_stream_prefixes=" cpu. , * ")
    assert settings.metrics_prefixes == ("cpu.", "")
    assert Settings().metrics_prefixes == ()


# --- real processes: open event streams, and several workers ----------------------------------


def real_scrape(url: str) -> Scrape:
    # A new connection each time, so that any worker may answer.
    with httpx.Client() as http:
        response = http.get(f"{url}/metrics")
    assert response.status_code == 200
    return Scrape(response.text)


def test_workers_add_up_and_open_event_streams_are_counted(
    tmp_path: Path, redis_server: RedisServer, redis_client: "redis.Redis"
) -> None:
    env = {
        "REDIS_URL": redis_server.url,
        "EMA_KEY_PREFIX": "test:",
        "EMA_WORKERS": "2",
        "EMA_METRICS_STREAM_PREFIXES": "w",
        "TMPDIR": str(tmp_path),  # where the workers' metric files go
    }
    service = ServiceProcess(tmp_path, **env)
    try:
        for i in range(30):
            with httpx.Client() as http:  # a new connection each: both workers get pushes
                response = http.post(f"{service.url}/v1/streams/w{i % 3}/values", json={"value": i})
                assert response.status_code == 200
        files = {path.name.split("_")[0] for path in tmp_path.glob("ema-metrics-*/*.db")}
        assert {"counter", "histogram"} <= files
        for _ in range(6):
            metrics = real_scrape(service.url)
            assert metrics.value("ema_pushes_total") == 30
            labels = {"route": PUSH_ROUTE, "method": "POST", "status": "200"}
            assert metrics.value("ema_http_requests_total", **labels) == 30
            assert metrics.value("ema_stream_updates_total", stream="w0") == 10
            assert metrics.value("ema_subscriptions_open") == 0
        with httpx.stream("GET", f"{service.url}/v1/streams/w0/events", timeout=10) as events:
            assert events.status_code == 200
            for _ in range(6):
                assert real_scrape(service.url).value("ema_subscriptions_open") == 1
        # The server notices the client has gone at once (it listens for the disconnect).
        deadline = time.monotonic() + 5
        while real_scrape(service.url).value("ema_subscriptions_open") != 0:
            assert time.monotonic() < deadline, "the closed event stream is still counted"
            time.sleep(0.05)
        for _ in range(6):
            assert real_scrape(service.url).value("ema_subscriptions_open") == 0
    finally:
        service.kill()


def test_workers_get_a_private_metrics_folder_and_stale_ones_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv(MULTIPROC_DIR, "set only so that the teardown restores the environment")
    monkeypatch.delenv(MULTIPROC_DIR)
    assert multiprocess_directory(1) is None
    assert MULTIPROC_DIR not in os.environ
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"ema-metrics-{dead.pid}-x"
    live = tmp_path / f"ema-metrics-{os.getppid()}-y"
    unrelated = tmp_path / "ema-metrics-notapid"
    for folder in (stale, live, unrelated):
        folder.mkdir()
    path = multiprocess_directory(2)
    assert path is not None
    assert os.environ[MULTIPROC_DIR] == path
    assert Path(path).parent == tmp_path
    assert Path(path).name.startswith(f"ema-metrics-{os.getpid()}-")
    assert not stale.exists()
    assert live.exists()
    assert unrelated.exists()
    remove_multiprocess_directory(path)
    assert not Path(path).exists()
    assert MULTIPROC_DIR not in os.environ


@pytest.mark.anyio
async def test_counts_added_up_in_a_loop_turn_read_as_each_one_observed() -> None:
    # Values on, between and beyond the buckets' bounds, reported in one event-loop turn.
    seconds = [0.0, 0.0001, 0.00010001, 0.0025, 0.003, 0.1, 0.1, 4.9, 5.0, 7.5, 1e9]
    metrics = Metrics()
    for value in seconds:
        metrics.script_ran(value)
    metrics.applied(3)
    metrics.applied(1000)
    await anyio.lowlevel.checkpoint()  # the turn ends: what it counted is written

    def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
        return [
            (sample.name, sample.labels, sample.value)
            for family in registry.collect()
            if family.name == "ema_script_duration_seconds"
            for sample in family.samples
            if not sample.name.endswith("_created")
        ]

    # prometheus-client's own Histogram, given each value by observe(), as the reference.
    mine = samples(metrics.registry)
    bounds = [float(labels["le"]) for name, labels, _ in mine if name.endswith("_bucket")]
    reference = CollectorRegistry()
    histogram = Histogram("ema_script_duration_seconds", "", buckets=bounds, registry=reference)
    for value in seconds:
        histogram.observe(value)
    assert len(bounds) > 10
    assert mine == samples(reference)
    assert metrics.registry.get_sample_value("ema_pushes_total") == 2
    assert metrics.registry.get_sample_value("ema_values_applied_total") == 1003
