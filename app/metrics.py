"""Prometheus metrics: the service's own, in a registry of its own per app, and the current
values of chosen streams, read from Redis when `/metrics` is scraped.

Names follow Prometheus' conventions: the `ema_` namespace, base units (seconds), `_total` on
counters. Request metrics are labelled by route *template* (`/v1/streams/{name}/values`), never
by the raw path, so that their number of series is bounded by the routes, not by the streams.

With several worker processes each keeps its values in files in `PROMETHEUS_MULTIPROC_DIR`
(prometheus-client's multiprocess mode, which `python -m app` sets up): a scrape, whichever
worker answers it, adds up every worker's.
"""

import asyncio
import bisect
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute
from starlette.types import Scope

from app import __version__
from app.errors import StoreUnavailable
from app.models import StreamState
from app.store import StreamStore

MULTIPROC_DIR: Final = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own variable
UNMATCHED: Final = "unmatched"  # the route label of a path no route serves (a 404)
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
_HTTP_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_SCRIPT_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_SCRIPT_BUCKETS_SLOW: Final = (0.25, 0.5, 1, 2.5, 5)
_DIR_PREFIX: Final = "ema-metrics-"
_PAGE: Final = 1000  # names per listing page and states per pipelined read, at scrape time
# Every `kind` of ema_redis_errors_total (app.store reports these): pre-created at zero, so that
# the first errors after a start are an increase, not a series appearing at 3.
REDIS_ERROR_KINDS: Final = (
    "connection",
    "timeout",
    "loading",
    "busy",
    "readonly",
    "masterdown",
    "tryagain",
    "clusterdown",
    "error",
)
# Statuses pre-created for every route and method: those the error-ratio alert counts.
_PRECREATED_STATUSES: Final = ("500", "503")


def multiprocess_directory(workers: int) -> str | None:
    """For several worker processes, a fresh, private `PROMETHEUS_MULTIPROC_DIR`, set in the
    environment they inherit: it must be set before they start (prometheus-client reads it when
    it is imported). Remove it with remove_multiprocess_directory once they have stopped."""
    if workers <= 1:
        return None
    # A folder left by a service that was killed (it could not remove it) goes now.
    for stale in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*-*"):
        owner = stale.name.removeprefix(_DIR_PREFIX).split("-")[0]
        if owner.isdigit() and not _alive(int(owner)):
            shutil.rmtree(stale, ignore_errors=True)
    path = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
    os.environ[MULTIPROC_DIR] = path
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_multiprocess_directory(path: str | None) -> None:
    if path is not None:
        os.environ.pop(MULTIPROC_DIR, None)
        shutil.rmtree(path, ignore_errors=True)


class Metrics:
    """The service's metrics. Also the store's observer: it reports script calls, pushes
    applied and Redis errors here (see app.store.StoreObserver)."""

    def __init__(self, *, stream_prefixes: Sequence[str] = (), max_streams: int = 1000) -> None:
        """Streams whose name starts with one of `stream_prefixes` ("" for every stream) are
        exported as gauges at scrape time, at most `max_streams` of them."""
        self.stream_prefixes = tuple(stream_prefixes)
        self.max_streams = max_streams
        self.registry = CollectorRegistry()
        self._multiprocess_dir = os.environ.get(MULTIPROC_DIR) or None
        registry = self.registry
        self.requests = Counter(
            "ema_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "ema_http_request_duration_seconds",
            "Time from a request's arrival to its response's start (for an event stream: until "
            "it is open), by route template, method and status.",
            ["route", "method", "status"],
            buckets=_HTTP_BUCKETS,
            registry=registry,
        )
        self.pushes = Counter(
            "ema_pushes", "Pushes applied (an idempotent replay is not).", registry=registry
        )
        self.values_applied = Counter(
            "ema_values_applied",
            "Values applied by pushes, batches counted by value.",
            registry=registry,
        )
        self.redis_errors = Counter(
            "ema_redis_errors",
            "Failed Redis calls, by kind: connection, timeout, loading, busy, readonly, "
            "masterdown, tryagain, clusterdown or error (any other error reply).",
            ["kind"],
            registry=registry,
        )
        self.script_duration = Histogram(
            "ema_script_duration_seconds",
            "Duration of push script calls as the service sees them (round trip included).",
            buckets=_SCRIPT_BUCKETS + _SCRIPT_BUCKETS_SLOW,
            registry=registry,
        )
        self.subscriptions = Gauge(
            "ema_subscriptions_open",
            "Event streams (Server-Sent Events subscriptions) open now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        build = Gauge(
            "ema_build_info",
            "Always 1: the service's version and the Python it runs on, as labels.",
            ["version", "python"],
            registry=registry,
            multiprocess_mode="max",
        )
        build.labels(__version__, platform.python_version()).set(1)
        for kind in REDIS_ERROR_KINDS:
            self.redis_errors.labels(kind)
        # Labelled children, looked up once per label set: the push path is benchmarked.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._routes: RouteMatcher | None = None
        # What requests and script calls add up to in this event-loop turn, written to the
        # metrics at its end (and before a scrape): with several workers each write goes to a
        # memory-mapped file (a lock, a getpid, a store), which per request and per call cost a
        # push more than all its other bookkeeping.
        self._counts: dict[Counter, float] = {}
        self._observed: dict[Histogram, list[float]] = {}  # [sum, count per bucket...]
        self._flush_scheduled = False

    # --- the request middleware's and the store's reports -----------------------------------

    def request_done(self, scope: Scope, status: int, seconds: float) -> None:
        """An HTTP request was answered (its response started) with `status` after `seconds`."""
        routes = self._routes
        if routes is None:
            # The app's routes, read once: the first request comes after every route was added.
            routes = self._routes = RouteMatcher(_flat_routes(scope["app"].routes))
        method = scope["method"]
        key = (routes(scope["path"]), method if method in _METHODS else "other", status)
        children = self._children.get(key)
        if children is None:
            labels = (*key[:2], str(status))
            children = self.requests.labels(*labels), self.request_duration.labels(*labels)
            self._children[key] = children
        self._count(children[0])
        self._observe(children[1], seconds)

    def precreate_routes(self, routes: Sequence[BaseRoute]) -> None:
        """Every route's 5xx request counters, at zero from the start: a rate or increase over
        them then sees the first failures (a series born at 3 reads as no increase)."""
        for route in _flat_routes(routes):
            template = getattr(route, "path_format", None)
            methods = getattr(route, "methods", None) or ()
            if not isinstance(template, str) or not template.startswith("/v1/"):
                continue
            for method in sorted(set(methods) & _METHODS - {"HEAD"}):
                for status in _PRECREATED_STATUSES:
                    self.requests.labels(template, method, status)

    def script_ran(self, seconds: float) -> None:
        self._observe(self.script_duration, seconds)

    def applied(self, values: int) -> None:
        self._count(self.pushes)
        self._count(self.values_applied, values)

    def redis_error(self, kind: str) -> None:
        self.redis_errors.labels(kind).inc()

    def _count(self, counter: Counter, amount: float = 1) -> None:
        self._counts[counter] = self._counts.get(counter, 0) + amount
        self._flush_soon()

    def _observe(self, histogram: Histogram, value: float) -> None:
        observed = self._observed.get(histogram)
        if observed is None:
            observed = self._observed[histogram] = [0.0] * (1 + len(histogram._upper_bounds))
        observed[0] += value
        # The bucket observe() would count it in: the first bound at or above it.
        observed[1 + bisect.bisect_left(histogram._upper_bounds, value)] += 1
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop: nothing to wait for
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what was counted since the last flush to the metrics."""
        self._flush_scheduled = False
        counts, self._counts = self._counts, {}
        for counter, amount in counts.items():
            counter.inc(amount)
        observed, self._observed = self._observed, {}
        for histogram, (total, *buckets) in observed.items():
            # observe() for each value, added up: its sum, and the count of each bucket (the
            # histogram keeps them per bucket, cumulated as it is collected).
            histogram._sum.inc(total)
            for bucket, count in zip(histogram._buckets, buckets, strict=True):
                if count:
                    bucket.inc(count)

    def close(self) -> None:
        """This process stops: drop its share of the live gauges (open subscriptions)."""
        self.flush()
        if self._multiprocess_dir is not None:
            mark_process_dead(os.getpid(), self._multiprocess_dir)  # type: ignore[no-untyped-call]

    # --- the scrape ---------------------------------------------------------------------------

    async def scrape(self, store: StreamStore, accept: str | None) -> tuple[bytes, str]:
        """The exposition for one scrape, in the format the `Accept` header asks for (the text
        format by default, OpenMetrics if asked), and its content type."""
        self.flush()
        states, truncated = await self._streams(store)
        collector = StreamGauges(self._collector(), states, truncated)
        encoder, content_type = choose_encoder(accept or "")
        # Multiprocess mode reads files: off the event loop, as is formatting many series.
        body = await anyio.to_thread.run_sync(encoder, collector)
        return body, content_type

    async def _streams(self, store: StreamStore) -> tuple[list[StreamState], bool]:
        """The streams matching the prefixes, at most max_streams (the SCAN order decides which
        when more match), and whether more matched."""
        if not self.stream_prefixes or not self.max_streams:
            return [], False
        names: dict[str, None] = {}  # an ordered set: prefixes may overlap, SCAN may repeat
        truncated = False
        try:
            for prefix in self.stream_prefixes:
                cursor = None
                while not truncated:
                    room = self.max_streams + 1 - len(names)  # one more tells it was cut
                    page = await store.list_names(prefix, cursor, min(room, _PAGE))
                    names.update(dict.fromkeys(page.streams))
                    truncated = len(names) > self.max_streams
                    cursor = page.next_cursor
                    if cursor is None:
                        break
            chosen = list(names)[: self.max_streams]
            states: list[StreamState] = []
            for start in range(0, len(chosen), _PAGE):
                states += await store.states(chosen[start : start + _PAGE])
        except StoreUnavailable:
            # Counted in ema_redis_errors_total; the service's own metrics still get scraped.
            return [], False
        return states, truncated

    def _collector(self) -> Collector:
        if self._multiprocess_dir is None:
            return self.registry
        # Every worker's values, this one's included, from their files: collecting this
        # process's registry too would count it twice.
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
        return registry


class StreamGauges(Collector):
    """The service's metrics followed by the values of the streams read for this scrape."""

    def __init__(self, base: Collector, states: list[StreamState], truncated: bool) -> None:
        self._base = base
        self._states = states
        self._truncated = truncated

    def collect(self) -> Iterable[Metric]:
        yield from self._base.collect()
        # `kind` says what a value is (mean: the values' unit; rate: events per second), so one
        # query graphs any stream's value and windows whatever its kind.
        value = GaugeMetricFamily(
            "ema_stream_value",
            "The stream's main average: its shadow (decay), its time-weighted mean (halflife), "
            "or for kind=rate its events per second as of the scrape.",
            labels=["stream", "kind"],
        )
        window = GaugeMetricFamily(
            "ema_stream_window",
            "Each named window's average, in the same unit as ema_stream_value.",
            labels=["stream", "window", "kind"],
        )
        debiased = GaugeMetricFamily(
            "ema_stream_debiased", "The stream's bias-corrected average.", labels=["stream"]
        )
        std = GaugeMetricFamily(
            "ema_stream_std",
            "The exponentially weighted standard deviation of the stream's values (a band: "
            "value +- k * std).",
            labels=["stream"],
        )
        z = GaugeMetricFamily(
            "ema_stream_z",
            "The last value's z-score against the mean and std before it (alert on its size).",
            labels=["stream"],
        )
        last = GaugeMetricFamily(
            "ema_stream_last",
            "The last raw value pushed to the stream (for kind=rate: an event count).",
            labels=["stream", "kind"],
        )
        updated = GaugeMetricFamily(
            "ema_stream_updated_timestamp_seconds",
            "Redis server time of the stream's last update, Unix seconds.",
            labels=["stream"],
        )
        updates = CounterMetricFamily(
            "ema_stream_updates",
            "Updates applied to the stream (its count; starts over when it is reconfigured).",
            labels=["stream"],
        )
        info = GaugeMetricFamily(
            "ema_stream_info",
            "Always 1: the stream's configuration as labels (decay or halflife in seconds, the "
            "other empty; windows as name=decay or name=halflife s).",
            labels=["stream", "kind", "decay", "halflife", "windows"],
        )
        for state in self._states:
            name, config = state.name, state.config
            kind = config.kind
            if state.value is not None:
                value.add_metric([name, kind], state.value)
            if state.debiased is not None:
                debiased.add_metric([name], state.debiased)
            if state.std is not None:
                std.add_metric([name], state.std)
            if state.z is not None:
                z.add_metric([name], state.z)
            if state.last is not None:
                last.add_metric([name, kind], state.last)
            if state.updated_at is not None:
                updated.add_metric([name], state.updated_at)
            for window_name, averaged in (state.windows or {}).items():
                if averaged.value is not None:
                    window.add_metric([name, window_name, kind], averaged.value)
            updates.add_metric([name], state.count)
            info.add_metric(
                [
                    name,
                    kind,
                    _label(config.decay),
                    _label(config.halflife),
                    ",".join(
                        f"{w.name}=decay {w.decay}"
                        if w.decay is not None
                        else f"{w.name}=halflife {w.halflife}s"
                        for w in config.windows or ()
                    ),
                ],
                1,
            )
        yield from (value, window, debiased, std, z, last, updated, updates, info)
        yield GaugeMetricFamily(
            "ema_metrics_streams",
            "Streams exported as ema_stream_* series by this scrape (EMA_METRICS_STREAM_PREFIXES).",
            value=len(self._states),
        )
        yield GaugeMetricFamily(
            "ema_metrics_streams_truncated",
            "1 when more streams matched than EMA_METRICS_MAX_STREAMS and only that many were "
            "exported; 0 otherwise.",
            value=int(self._truncated),
        )


def _label(number: float | None) -> str:
    return "" if number is None else repr(number)


class RouteMatcher:
    """Maps a request path to the template of the route that serves it, without routing."""

    def __init__(self, routes: Iterable[object]) -> None:
        self._exact: dict[str, str] = {}
        self._patterns: list[tuple[re.Pattern[str], str]] = []
        seen: set[str] = set()
        for route in routes:
            template = getattr(route, "path_format", None)
            regex = getattr(route, "path_regex", None)
            if not isinstance(template, str) or not isinstance(regex, re.Pattern):
                continue
            if "{" not in template:
                self._exact.setdefault(template, template)
            elif template not in seen:
                seen.add(template)
                self._patterns.append((regex, template))

    def __call__(self, path: str) -> str:
        found = self._exact.get(path)
        if found is not None:
            return found
        for regex, template in self._patterns:
            if regex.match(path):
                return template
        return UNMATCHED


def _flat_routes(routes: Sequence[BaseRoute]) -> Iterable[object]:
    """Every route, those of included routers too (which recent FastAPI keeps nested)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: included routers' routes are copied into app.routes
        return routes
    return iter_route_contexts(routes)
