"""Benchmark the EMA service against a bare-ASGI floor and the Redis ceiling, in one run.

    .venv/bin/python bench/run.py [--quick] [--duration SECONDS] [--rounds N]

Starts a private redis-server (no persistence) on a free port, the service (`python -m app`)
with its push fast path and without it, and the floor (bench/floor.py), each with one uvicorn
worker per core. Then, workload by workload, it measures the Redis ceiling (redis-benchmark
replaying the service's own EVALSHA of app/lua/push.lua), the floor and the service in
interleaved rounds, so that the ratios compare figures taken moments apart on a noisy machine,
and prints one markdown table. Then the same for streams of each kind (fixed decay, time-based,
three windows, rate), as ratios to the fixed-decay stream, and pushes with open subscribers.
See bench/README.md.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from capture import PushCall, Template, push_call, read_template, watch
from harness import (
    ROOT,
    Rounds,
    app_version,
    header_lines,
    load_line,
    markdown_table,
    progress,
    redis_version,
    start_service,
)
from harness import main as run_bench
from loadgen import RedisBenchmark, Result, WrkLoad
from servers import BenchError, Group, HttpServer, RedisServer, stop_all
from subscribers import SubscriberFigures
from subscribers import measure as measure_subscribers

PUSH_LUA = ROOT / "app" / "lua" / "push.lua"
STREAMS = 16  # stream names s000000000000.. s000000000015, as redis-benchmark's -r 16 makes them
RANDOM_NAME = "s__rand_int__"  # what redis-benchmark -r turns into those names
PIPELINE = 32


def stream_name(index: int) -> str:
    return f"s{index:012d}"


def batch_values(size: int) -> list[float]:
    """Deterministic, varied values with short decimal forms (1.0 .. 10.99)."""
    return [1 + (i * 37 % 1000) / 100 for i in range(size)]


@dataclass(frozen=True)
class Workload:
    label: str
    batch: int  # values per request; 0 for a read
    timestamped: bool = False  # single values only: each carries the client's clock

    def body(self) -> dict[str, object]:
        if self.batch == 1:
            body: dict[str, object] = {"value": 1.5}
            if self.timestamped:
                body["timestamp"] = time.time()
            return body
        return {"values": batch_values(self.batch)}

    def values(self) -> list[str]:
        """The values of `body` as the service passes them to push.lua."""
        return [repr(value) for value in ([1.5] if self.batch == 1 else batch_values(self.batch))]


PUSH = Workload("push 1 value", 1)
GET = Workload("GET", 0)
BATCH_100 = Workload("push batch of 100", 100)
BATCH_1000 = Workload("push batch of 1,000", 1000)
WORKLOADS = (PUSH, GET, BATCH_100, BATCH_1000)
PUSH_AT = Workload("push 1 value with timestamp", 1, timestamped=True)


@dataclass(frozen=True, eq=False)
class Kind:
    """A stream configuration (the body of PUT /v1/streams/{name}) measured in the streams
    scenario."""

    label: str
    config: Mapping[str, object]


DECAY = Kind("fixed decay", {"decay": 0.99})
HALFLIFE = Kind("time-based", {"halflife": 60})
WINDOWS = Kind(
    "three windows",
    {
        "halflife": 10,
        "windows": [
            {"name": "1m", "halflife": 60},
            {"name": "5m", "halflife": 300},
            {"name": "15m", "halflife": 900},
        ],
    },
)
RATE = Kind("rate", {"halflife": 60, "kind": "rate"})
KINDS = (DECAY, HALFLIFE, WINDOWS, RATE)  # the first is the reference of the ratios
# Measured together in interleaved rounds, so that each round's figures can be compared: the
# first workload of a group is the reference (and the one redis-benchmark replays).
STREAM_GROUPS = ((PUSH, PUSH_AT), (BATCH_100,))
STREAM_WORKLOADS = tuple(workload for group in STREAM_GROUPS for workload in group)
AIM = 0.8

SERVICE = "service"
NO_FAST_PATH = "service, EMA_FAST_PATH=false"
FLOOR = "floor (bench/floor.py)"
CEILING = "ceiling (redis-benchmark)"
TARGETS = (SERVICE, NO_FAST_PATH, FLOOR, CEILING)


@dataclass
class Figure(Rounds):
    """One figure of the table: every round of one target on one workload."""

    target: str
    workload: Workload
    label: str
    pipeline: int = 1
    kind: Kind | None = None  # streams scenario: the streams' configuration; None: the default
    results: list[Result] = field(default_factory=list)
    app_cpu: float = 0.0  # seconds, all rounds: the HTTP server's processes, workers included
    redis_cpu: float = 0.0  # seconds, all rounds: redis-server

    def rates(self) -> list[float]:
        """Per round: requests/s, or values/s for batches."""
        return [r.calls_per_second * max(self.workload.batch, 1) for r in self.results]

    def per_call_us(self, cpu_seconds: float) -> float:
        return cpu_seconds * 1e6 / max(sum(r.calls for r in self.results), 1)

    @property
    def unit(self) -> str:
        if self.workload.batch > 1:
            return "values/s"
        return "calls/s" if self.target == CEILING else "req/s"

    def describe(self) -> str:
        kind = f"{self.kind.label} stream, " if self.kind else ""
        return f"{self.target}: {kind}{self.label}"


@dataclass
class Job:
    """How to warm up for, and take one round of, a figure."""

    figure: Figure
    warm: Callable[[], None]
    measure: Callable[[], Result]
    app: Group | None
    check: Callable[[Result], Result] = lambda result: result


class Bench:
    """The processes under test and the figures measured on them."""

    def __init__(self, args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack):
        self.args = args
        self.workdir = workdir
        self.workers = len(os.sched_getaffinity(0))
        self.wrk = WrkLoad(args.threads, args.connections)
        self.figures: list[Figure] = []
        self.stream_figures: list[Figure] = []
        self.kind_fields: dict[Kind, dict[str, str]] = {}
        self.warmed: set[str] = set()
        self.servers: dict[str, HttpServer] = {}
        # Callbacks run last first: the HTTP servers stop (together), then redis-server.
        self.version = app_version()
        # The floor and the service without fast path are in the main table only.
        main_table = not (args.subscribers_only or args.streams_only)
        progress(
            "starting redis-server and the service"
            + (", with and without the fast path" if main_table else "")
        )
        self.redis = RedisServer(workdir)
        stack.callback(self.redis.stop)
        stack.callback(lambda: stop_all(list(self.servers.values())))
        self.redis.wait_ready()
        with self.redis.client() as client:
            self.sha = str(client.script_load(PUSH_LUA.read_text(encoding="utf-8")))
        self.ceiling = RedisBenchmark(self.redis.port, args.connections, STREAMS)
        for target in (SERVICE, NO_FAST_PATH) if main_table else (SERVICE,):
            self._http_server(target)
        for server in self.servers.values():
            server.wait_ready()
        self.push_call, self.read_call = self._capture(self.servers[SERVICE])
        if main_table:
            progress("starting the floor")
            self._http_server(FLOOR).wait_ready()
        if args.streams:
            self._capture_kinds(self.servers[SERVICE])
        self.bodies = {}
        for index, workload in enumerate(WORKLOADS):
            self.bodies[workload] = path = workdir / f"body-{index}.json"
            path.write_text(json.dumps(workload.body()))

    def _capture(self, service: HttpServer) -> tuple[PushCall, Template]:
        """The EVALSHA the service sends for a push and the command it sends for a GET."""
        name, values = stream_name(0), (12.375, 23.625)
        pushed = watch(self.redis.port, lambda: http_json(service.url, name, {"values": values}))
        push = push_call(pushed, name, (repr(values[0]), repr(values[1])))
        if push.head.argv[1] != self.sha:
            raise BenchError(f"the service runs script {push.head.argv[1]}, not {PUSH_LUA}")
        read = read_template(watch(self.redis.port, lambda: http_json(service.url, name)), name)
        return push, read

    def _capture_kinds(self, service: HttpServer) -> None:
        """Each kind's stream as the service's PUT creates it (its hash before any value), for
        reset() to recreate; then check that a push to such a stream replies with that
        configuration."""
        name = stream_name(0)
        with self.redis.client() as client:
            for kind in KINDS:
                http_json(service.url, name, kind.config, method="PUT")
                self.kind_fields[kind] = client.hgetall(self.stream_key(name))
        for kind in KINDS:
            self.reset(kind)
            state = http_json(service.url, name, PUSH_AT.body())
            if not matches(kind.config, state.get("config")) or state.get("count") != 1:
                raise BenchError(
                    f"a push to a stream created as {json.dumps(kind.config)} replied {state}"
                )

    def _http_server(self, target: str) -> HttpServer:
        log = f"server-{len(self.servers)}.log"
        if target == FLOOR:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("EMA_", "REDIS_"))}
            env |= {
                "REDIS_URL": self.redis.url,
                "PYTHONUNBUFFERED": "1",
                "BENCH_NAME": self.push_call.head.name,
                "BENCH_PUSH": json.dumps(self.push_call.head.argv),
                "BENCH_PER_VALUE": json.dumps(self.push_call.per_value),
                "BENCH_READ": json.dumps(self.read_call.argv),
            }
            argv = [
                sys.executable, "-m", "uvicorn", "--app-dir", "bench", "floor:app",
                "--host", "127.0.0.1", "--port", "{port}", "--workers", str(self.workers),
                "--no-access-log", "--log-level", "info",
            ]  # fmt: skip
            server = HttpServer(target, argv, env, ROOT, self.workdir / log)
        else:
            fast_path = "false" if target == NO_FAST_PATH else "true"
            server = start_service(
                self.redis, self.workdir, name=target, log=log, env={"EMA_FAST_PATH": fast_path}
            )
        self.servers[target] = server
        return server

    # --- state ----------------------------------------------------------------------------------

    def stream_key(self, name: str) -> str:
        """The stream's hash: KEYS[1] of the service's EVALSHA."""
        return self.push_call.head.bind(name)[3]

    def reset(self, kind: Kind | None = None) -> None:
        """Empty Redis, then create the streams: by pushing one value to each, as the service
        would (so that GETs find them); or, for a `kind`, as its PUT creates them.

        In one transaction: a push still on its way from the last load must not land between
        the flush and the creation, where it would create a stream with the defaults that the
        kind's fields would then be merged into."""
        with self.redis.client() as client:
            pipe = client.pipeline(transaction=True)
            pipe.flushall()
            for index in range(STREAMS):
                name = stream_name(index)
                if kind is None:
                    pipe.execute_command(*self.push_call.bind(name, ["1.0"]))
                else:
                    pipe.hset(self.stream_key(name), mapping=self.kind_fields[kind])
            pipe.execute()

    def applied(self) -> int:
        """Values applied to all the streams so far (the sum of their counts, field n)."""
        with self.redis.client() as client:
            pipe = client.pipeline(transaction=False)
            for index in range(STREAMS):
                pipe.hget(self.stream_key(stream_name(index)), "n")
            return sum(int(n or 0) for n in pipe.execute())

    # --- jobs -----------------------------------------------------------------------------------

    def http_job(self, target: str, workload: Workload, kind: Kind | None = None) -> Job:
        server = self.servers[target]
        if workload.timestamped:
            script, args = "post_now.lua", [str(STREAMS), json.dumps(PUSH.body()["value"])]
        elif workload.batch:
            script, args = "post.lua", [str(STREAMS), str(self.bodies[workload])]
        else:
            script, args = "get.lua", [str(STREAMS)]

        def warm() -> None:
            http_json(server.url, stream_name(0), workload.body() if workload.batch else None)
            # A server's first figure always warms up (connection pools, first calls).
            seconds = self.args.warmup if target in self.warmed else max(self.args.warmup, 1)
            self.warmed.add(target)
            if seconds:
                self.wrk.run(server.url, script, args, seconds)

        def measure() -> Result:
            result = self.wrk.run(server.url, script, args, self.args.duration)
            if not server.running():
                raise BenchError(f"{target} died during the run:\n{server.log_tail()}")
            return result

        return Job(Figure(target, workload, workload.label, kind=kind), warm, measure, server)

    def ceiling_job(self, workload: Workload, pipeline: int = 1, kind: Kind | None = None) -> Job:
        if workload.batch:
            command = self.push_call.bind(RANDOM_NAME, workload.values())
            label = f"EVALSHA push.lua, {workload.batch:,} value" + "s" * (workload.batch > 1)
        else:
            command = self.read_call.bind(RANDOM_NAME)
            label = f"the GET's {command[0]}"
        if pipeline > 1:
            label += f", pipelined -P {pipeline}"
        calls = 0
        before = 0

        def warm() -> None:
            nonlocal calls
            rate = self.ceiling.calibrate(command, pipeline, self.args.warmup)
            calls = max(4 * self.args.connections * pipeline, int(rate * self.args.duration))

        def measure() -> Result:
            nonlocal before
            before = self.applied()
            return self.ceiling.run(command, calls, pipeline)

        def check(result: Result) -> Result:
            # redis-benchmark does not count error replies: check that every call applied.
            if not workload.batch:
                return result
            missing = result.calls - (self.applied() - before) // workload.batch
            return dataclasses.replace(result, errors=max(0, missing))

        figure = Figure(CEILING, workload, label, pipeline, kind)
        return Job(figure, warm, measure, None, check)

    def jobs(self, workload: Workload) -> list[Job]:
        jobs = [self.ceiling_job(workload)]
        if workload is PUSH:
            jobs.append(self.ceiling_job(workload, PIPELINE))
        jobs += [self.http_job(FLOOR, workload), self.http_job(SERVICE, workload)]
        jobs.append(self.http_job(NO_FAST_PATH, workload))
        return jobs

    def run(self) -> None:
        """The main table."""
        for workload in WORKLOADS:
            jobs = self.jobs(workload)
            self._interleave(workload.label, jobs)
            self.figures += [job.figure for job in jobs]

    def run_streams(self) -> None:
        """Streams of each kind: pushes through the service and the EVALSHA alone, group by
        group of workloads, every kind of a group in the same rounds."""
        for group in STREAM_GROUPS:
            jobs = [self.ceiling_job(group[0], kind=kind) for kind in KINDS]
            jobs += [self.http_job(SERVICE, w, kind) for kind in KINDS for w in group]
            title = "streams of each kind: " + ", ".join(w.label for w in group)
            self._interleave(title, jobs, alternate=True)
            self.stream_figures += [job.figure for job in jobs]

    def _interleave(self, title: str, jobs: Sequence[Job], alternate: bool = False) -> None:
        """Warm up for every job, then take one round of each in turn, `rounds` times; with
        `alternate`, every other round in reverse order, so that a drift of the machine's speed
        during a round does not favour the jobs that come first."""
        for job in jobs:
            progress(f"warming up: {job.figure.describe()}")
            self.reset(job.figure.kind)
            job.warm()
        for round_ in range(1, self.args.rounds + 1):
            progress(f"{title}: round {round_} of {self.args.rounds}")
            backwards = alternate and round_ % 2 == 0
            for job in reversed(jobs) if backwards else jobs:
                self.reset(job.figure.kind)
                self._round(job)

    def _round(self, job: Job) -> None:
        """One round, charged the CPU used meanwhile by redis-server and by the job's app."""
        app_before = job.app.cpu_seconds() if job.app else 0.0
        redis_before = self.redis.cpu_seconds()
        result = job.measure()
        job.figure.redis_cpu += self.redis.cpu_seconds() - redis_before
        if job.app:
            job.figure.app_cpu += job.app.cpu_seconds() - app_before
        job.figure.results.append(job.check(result))


def subscriber_figures(bench: Bench) -> SubscriberFigures:
    """Push throughput with open subscribers against none, and the delay to delivery."""
    server = bench.servers[SERVICE]
    args = [str(STREAMS), str(bench.bodies[PUSH])]
    bench.reset()
    bench.wrk.run(server.url, "post.lua", args, max(bench.args.warmup, 1))
    return measure_subscribers(
        server,
        [stream_name(index) for index in range(STREAMS)],
        bench.args.subscribers,
        bench.args.rounds,
        push=lambda: bench.wrk.run(server.url, "post.lua", args, bench.args.duration),
        # 4 connections, each pausing 20ms after every reply: a steady ~150 pushes/s.
        paced=lambda: WrkLoad(1, 4).run(server.url, "paced.lua", [*args, "20"], 4),
        reset=bench.reset,
        progress=progress,
    )


def http_json(url: str, name: str, body: object = None, method: str = "POST") -> dict[str, object]:
    """One request by hand (a push if `body`, else a GET; with method PUT, a configuration), and
    the stream's state it replies: a target that does not work fails loudly here, not as a rate
    of errors."""
    if body is None:
        request = urllib.request.Request(f"{url}/v1/streams/{name}")
    else:
        path = f"/v1/streams/{name}" + ("/values" if method == "POST" else "")
        request = urllib.request.Request(
            url + path,
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
            method=method,
        )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            state = json.load(response)
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:500]
        raise BenchError(f"{request.get_method()} {request.full_url}: {error}: {detail}") from error
    except OSError as error:
        raise BenchError(f"{request.get_method()} {request.full_url}: {error}") from error
    if not isinstance(state, dict) or state.get("name") != name:
        raise BenchError(f"{request.get_method()} {request.full_url}: unexpected reply {state}")
    return state


def matches(expected: object, actual: object) -> bool:
    """Whether `actual` (a JSON reply) says what `expected` does: the same numbers and strings,
    and at least the keys of every object."""
    if isinstance(expected, Mapping):
        return isinstance(actual, Mapping) and all(
            key in actual and matches(value, actual[key]) for key, value in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(matches(e, a) for e, a in zip(expected, actual, strict=True))
        )
    return expected == actual


# --- the table ---------------------------------------------------------------------------------

COLUMNS = (
    "target",
    "workload",
    "throughput (median)",
    "±",
    "p50 ms",
    "p99 ms",
    "÷ floor",
    "÷ ceiling",
    "app CPU µs/req",
    "÷ floor by CPU",
    "Redis CPU µs/req",
    "errors",
)


def find(figures: list[Figure], target: str, workload: Workload) -> Figure | None:
    matches = (f for f in figures if f.target == target and f.workload is workload)
    return next((f for f in matches if f.pipeline == 1), None)


def table(figures: list[Figure]) -> str:
    rows = []

    def order(figure: Figure) -> tuple[int, int, int]:
        return TARGETS.index(figure.target), WORKLOADS.index(figure.workload), figure.pipeline

    for figure in sorted(figures, key=order):
        floor = find(figures, FLOOR, figure.workload)
        ceiling = find(figures, CEILING, figure.workload)
        app_us = figure.per_call_us(figure.app_cpu) if figure.target != CEILING else None

        def versus(other: Figure | None, figure: Figure = figure) -> str:
            if other is None or figure.target in (other.target, CEILING):
                return ""
            return f"{figure.throughput / other.throughput:.2f}"

        by_cpu = ""
        if floor is not None and app_us and figure.target not in (FLOOR, CEILING):
            by_cpu = f"{floor.per_call_us(floor.app_cpu) / app_us:.2f}"
        cells = [
            figure.target,
            figure.label,
            f"{figure.throughput:,.0f} {figure.unit}",
            f"{figure.spread:.0%}" if len(figure.results) > 1 else "",
            f"{statistics.median(r.p50_ms for r in figure.results):.2f}",
            f"{statistics.median(r.p99_ms for r in figure.results):.2f}",
            versus(floor),
            versus(ceiling),
            "" if app_us is None else f"{app_us:,.0f}",
            by_cpu,
            f"{figure.per_call_us(figure.redis_cpu):,.1f}",
            str(sum(r.errors for r in figure.results)),
        ]
        rows.append(cells)
    return markdown_table(COLUMNS, rows, "ll" + "r" * (len(COLUMNS) - 2))


# --- the streams of each kind ------------------------------------------------------------------

STREAM_COLUMNS = (
    "target",
    "stream",
    "workload",
    "throughput (median)",
    "±",
    "p50 ms",
    "p99 ms",
    "÷ fixed decay",
    "rounds' ratios",
    "app CPU µs/req",
    "Redis CPU µs/req",
    "÷ fixed decay by CPU",
    "errors",
)


def reference(figures: Sequence[Figure], figure: Figure) -> Figure | None:
    """What `figure`'s ratios are to: the fixed-decay stream's figure on the first workload of
    its group (pushes without timestamps), by the same target."""
    group = next(group for group in STREAM_GROUPS if figure.workload in group)
    same = (f for f in figures if f.target == figure.target and f.workload is group[0])
    return next((f for f in same if f.kind is DECAY), None)


def round_ratios(figure: Figure, other: Figure) -> list[float]:
    """Round by round (the figures were taken in the same rounds), this throughput ÷ other's."""
    return [a / b for a, b in zip(figure.rates(), other.rates(), strict=True)]


def cost_us(figure: Figure) -> float:
    """CPU per request of the processes serving it: the app's and Redis', or Redis' alone."""
    return figure.per_call_us(figure.app_cpu + figure.redis_cpu)


def streams_table(figures: Sequence[Figure]) -> str:
    rows = []

    def order(figure: Figure) -> tuple[int, int, int, int]:
        group = next(i for i, group in enumerate(STREAM_GROUPS) if figure.workload in group)
        assert figure.kind is not None
        target = (SERVICE, CEILING).index(figure.target)
        return group, target, STREAM_WORKLOADS.index(figure.workload), KINDS.index(figure.kind)

    for figure in sorted(figures, key=order):
        assert figure.kind is not None
        base = reference(figures, figure)
        ratio = spread = by_cpu = ""
        if base is not None:
            ratios = round_ratios(figure, base)
            ratio = f"{statistics.median(ratios):.2f}"
            if len(ratios) > 1:
                spread = " … ".join(f"{r:.2f}" for r in (min(ratios), max(ratios)))
            by_cpu = f"{cost_us(base) / max(cost_us(figure), 1e-9):.2f}"
        if figure is base:
            ratio, spread = f"**{ratio}**", ""
        cells = [
            figure.target,
            figure.kind.label,
            figure.label,
            f"{figure.throughput:,.0f} {figure.unit}",
            f"{figure.spread:.0%}" if len(figure.results) > 1 else "",
            f"{statistics.median(r.p50_ms for r in figure.results):.2f}",
            f"{statistics.median(r.p99_ms for r in figure.results):.2f}",
            ratio,
            spread,
            "" if figure.target == CEILING else f"{figure.per_call_us(figure.app_cpu):,.0f}",
            f"{figure.per_call_us(figure.redis_cpu):,.1f}",
            by_cpu,
            str(sum(r.errors for r in figure.results)),
        ]
        rows.append(cells)
    return markdown_table(STREAM_COLUMNS, rows, "lll" + "r" * (len(STREAM_COLUMNS) - 3))


def streams_summary(figures: Sequence[Figure]) -> str:
    """The service's ratios, one line per workload, against the aim: by throughput, and by CPU
    (which noise affects less)."""
    lines = []
    for workload in STREAM_WORKLOADS:
        row = [f for f in figures if f.target == SERVICE and f.workload is workload]
        parts = []
        base: Figure | None = None
        for figure in row:
            base = reference(figures, figure)
            if base is None or figure is base or figure.kind is None:
                continue
            ratio = statistics.median(round_ratios(figure, base))
            by_cpu = cost_us(base) / max(cost_us(figure), 1e-9)
            parts.append(
                f"{figure.kind.label} **{ratio:.2f}**{' (below)' * (ratio < AIM)}, "
                f"by CPU {by_cpu:.2f}{' (below)' * (by_cpu < AIM)}"
            )
        if parts and base is not None:
            lines.append(
                f"- {workload.label}, ÷ fixed decay's {base.label} (aim: {AIM} or better): "
                + "; ".join(parts)
            )
    return "\n".join(lines)


def streams_report(bench: Bench) -> str:
    args = bench.args
    kinds = "\n".join(f"- {kind.label}: `{json.dumps(kind.config)}`" for kind in KINDS)
    return "\n\n".join(
        [
            f"Streams of each kind, each round on {STREAMS} fresh streams created as "
            f"`PUT /v1/streams/{{name}}` does with:\n\n{kinds}\n\n"
            f"pushed through the service (wrk -c{args.connections}; the timestamps are the "
            f"client's clock, bench/wrk/post_now.lua) and by redis-benchmark (the same EVALSHA "
            f"alone, samples without timestamps), in {args.rounds} interleaved round(s) of "
            f"{args.duration}s. Ratios are to the fixed-decay stream's figure in the same round "
            f"(median over the rounds, and their range); by CPU, to its CPU per request (the "
            f"service's and Redis', or Redis' alone for redis-benchmark):",
            streams_table(bench.stream_figures),
            streams_summary(bench.stream_figures),
        ]
    )


def preamble(bench: Bench) -> str:
    args, workers = bench.args, bench.workers
    return "\n".join(
        [
            *header_lines("run.py"),
            f"- nproc: {workers} (uvicorn workers per server: {workers}); "
            f"Python {platform.python_version()}; redis-server {redis_version()}",
            f"- app measured: commit {bench.version}",
            f"- {args.rounds} interleaved round(s) of {args.duration}s per figure, after "
            f"{args.warmup}s of warmup (at least 1s for a server's first figure); "
            f"wrk -t{args.threads} -c{args.connections}; redis-benchmark -c {args.connections} "
            f"-r {STREAMS}; {STREAMS} stream names",
            "- the service's push as sent to Redis (seen by MONITOR), replayed by the floor and "
            f"redis-benchmark: `{bench.push_call.show()}`; "
            f"its GET: `{bench.read_call.show()}`",
            load_line(),
        ]
    )


# --- entry point -------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run: one round, no warmup but a server's first",
    )
    parser.add_argument("--duration", type=int, help="seconds per measurement (default 2)")
    parser.add_argument(
        "--rounds", type=int, help="measurements per figure, interleaved (default 3, quick 1)"
    )
    parser.add_argument(
        "--warmup", type=int, help="seconds of warmup before each figure (default 1, quick 0)"
    )
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument(
        "--connections",
        type=int,
        default=32,
        help="wrk connections and redis-benchmark clients (default 32)",
    )
    parser.add_argument(
        "--subscribers",
        type=int,
        default=100,
        help="event streams open for the pushes-with-subscribers figures (default 100; 0: skip)",
    )
    only = parser.add_mutually_exclusive_group()
    only.add_argument(
        "--subscribers-only",
        action="store_true",
        help="only the pushes-with-subscribers figures (bench/subscribers.py)",
    )
    only.add_argument(
        "--streams-only",
        action="store_true",
        help="only the streams of each kind (time-based, windows, rate ÷ fixed decay)",
    )
    only.add_argument("--no-streams", action="store_true", help="skip the streams of each kind")
    args = parser.parse_args()
    args.streams = not (args.no_streams or args.subscribers_only)
    for name, default, quick in (("duration", 2, 2), ("rounds", 3, 1), ("warmup", 1, 0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    if min(args.duration, args.rounds, args.threads) < 1 or args.warmup < 0:
        parser.error("--duration, --rounds and --threads must be >= 1, --warmup >= 0")
    if args.connections < args.threads:
        parser.error("--connections must be >= --threads")
    return args


def main() -> int:
    args = parse_args()

    def measure(workdir: Path, stack: contextlib.ExitStack) -> Callable[[], str]:
        bench = Bench(args, workdir, stack)
        if not (args.subscribers_only or args.streams_only):
            bench.run()
        if args.streams:
            bench.run_streams()
        subscribed = None
        if args.subscribers > 0 and not args.streams_only:
            subscribed = subscriber_figures(bench)
        return lambda: report(bench, subscribed)

    return run_bench("bench", measure)


def report(bench: Bench, subscribed: SubscriberFigures | None) -> str:
    args = bench.args
    parts = [preamble(bench)]
    if bench.figures:
        parts.append(table(bench.figures))
    if bench.stream_figures:
        parts.append(streams_report(bench))
    if subscribed is not None:
        parts.append(
            f"Pushes of 1 value (wrk -c{args.connections}) to the {STREAMS} streams, with "
            f"{args.subscribers} event streams open on them (bench/subscribers.py) and with "
            f"none, in {args.rounds} interleaved round(s) of {args.duration}s:"
        )
        parts.append(subscribed.table())
    return "\n\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
