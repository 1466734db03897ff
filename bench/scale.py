"""Where the limit is: the service's pushes and bulk ingest against the Redis ceiling, the Lua
script against what a user would write instead on one hot key, and a million streams (memory
per stream, and throughput as a ratio to one stream), in one run, printed as one table.

    .venv/bin/python bench/scale.py            # about 4 minutes
    .venv/bin/python bench/scale.py --quick    # about a minute: one round, 100,000 streams

Starts a private redis-server (no persistence) and the service (`python -m app`, one worker per
core) on free loopback ports, learns the EVALSHA the service sends for a push (MONITOR, as
bench/run.py does) so that redis-benchmark replays exactly that call, and stops everything at
the end, on errors and on Ctrl-C. Progress goes to stderr, the markdown report to stdout. See
bench/README.md.
"""

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from alternatives import HotKeyResult, hot_key, lua, naive, optimistic
from capture import PushCall, push_call, watch
from harness import (
    Rounds,
    app_version,
    header_lines,
    load_line,
    machine,
    markdown_table,
    progress,
    start_service,
)
from harness import main as run_bench
from loadgen import RedisBenchmark, Result, WrkLoad
from servers import BenchError, RedisServer, resp

STREAMS = 16  # single pushes cycle over s000000000000 .. s000000000015
# Bulk pushes: (entries, values per entry), over the streams b000000000000, b000000000001, ...
BULKS = ((1000, 1), (100, 10))
PIPELINE = 32
CREATE_VALUES = ["1.5", "2.718281828459045"]
RANDOM_NAME = "s__rand_int__"  # redis-benchmark -r turns it into s000000000000 ..
HOT = "s000000000000"


def stream_name(index: int, prefix: str = "s") -> str:
    return f"{prefix}{index:012d}"


@dataclass
class Figure(Rounds):
    """One row: its measurements over the rounds (median reported)."""

    label: str
    unit: str
    per_call: int = 1  # values per measured call (request or script call)
    results: list[Result] = field(default_factory=list)
    hot: list[HotKeyResult] = field(default_factory=list)
    notes: str = ""
    # The Redis ceilings this figure is a fraction of: unpipelined, and pipelined.
    ceilings: tuple["Figure", "Figure"] | None = None

    def rates(self) -> list[float]:
        if self.hot:
            return [r.per_second for r in self.hot]
        return [r.calls_per_second * self.per_call for r in self.results]

    @property
    def p50(self) -> float:
        return statistics.median(r.p50_ms for r in (self.hot or self.results))

    @property
    def p99(self) -> float:
        return statistics.median(r.p99_ms for r in (self.hot or self.results))

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.results)


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack):
        self.args = args
        self.workdir = workdir
        self.workers = len(os.sched_getaffinity(0))
        self.wrk = WrkLoad(1, args.connections)
        # A bulk request is thousands of times the work of a push: a few at a time keep every
        # worker busy without queueing them for seconds.
        self.bulk_wrk = WrkLoad(1, args.bulk_connections)
        progress("starting redis-server and the service")
        self.redis = RedisServer(workdir)
        stack.callback(self.redis.stop)
        self.redis.wait_ready()
        self.service = start_service(self.redis, workdir)
        stack.callback(self.service.stop)
        self.service.wait_ready()
        self.push = self._capture()
        self.bodies: dict[str, Path] = {}
        bodies: dict[str, object] = {"one": {"value": 1.5}}
        for entries, values in BULKS:
            bodies[f"bulk-{entries}x{values}"] = {
                "entries": [
                    {"stream": stream_name(i, "b"), "values": [1.5] * values}
                    for i in range(entries)
                ]
            }
        for name, body in bodies.items():
            self.bodies[name] = path = workdir / f"{name}.json"
            path.write_text(json.dumps(body))
        self.memory: dict[str, str] = {}

    def _capture(self) -> PushCall:
        values = (12.375, 23.625)
        pushed = watch(
            self.redis.port, lambda: post(self.service.url, f"/v1/streams/{HOT}/values", values)
        )
        return push_call(pushed, HOT, (repr(values[0]), repr(values[1])))

    def ceiling(self, keyspace: int) -> RedisBenchmark:
        return RedisBenchmark(self.redis.port, self.args.connections, keyspace)

    # --- jobs: each returns a function that takes one round of a figure ------------------------

    def wrk_job(
        self, script: str, args: list[str], wrk: WrkLoad | None = None
    ) -> Callable[[], Result]:
        load = wrk or self.wrk

        def measure() -> Result:
            result = load.run(self.service.url, script, args, self.args.duration)
            if not self.service.running():
                raise BenchError(f"the service died:\n{self.service.log_tail()}")
            return result

        return measure

    def ceiling_job(
        self, name: str, keyspace: int, pipeline: int, values: int = 1
    ) -> Callable[[], Result]:
        command = self.push.bind(name, ["1.5"] * values)
        bench = self.ceiling(keyspace)
        rate = bench.calibrate(command, pipeline, 0.3)

        def measure() -> Result:
            return bench.run(command, max(1000, int(rate * self.args.duration)), pipeline)

        return measure

    def rounds(self, jobs: list[tuple[Figure, Callable[[], Result]]]) -> None:
        """Every figure's rounds, interleaved: round 1 of each, then round 2 of each, ..."""
        for _, measure in jobs:  # warm up: connections, pools, the script cache
            if self.args.warmup:
                measure()
        for number in range(self.args.rounds):
            for figure, measure in jobs:
                progress(f"round {number + 1}/{self.args.rounds}: {figure.label}")
                figure.results.append(measure())

    # --- the three parts --------------------------------------------------------------------

    def service_against_ceiling(self) -> list[Figure]:
        self.redis_flush()
        jobs: list[tuple[Figure, Callable[[], Result]]] = []
        ceilings: dict[int, tuple[Figure, Figure]] = {}
        for values in sorted({1} | {values for _, values in BULKS}):
            what = f"EVALSHA push.lua, {values} value{'s' * (values > 1)} per call"
            unit = "calls/s" if values == 1 else "values/s"
            unpiped = Figure(f"Redis ceiling: {what} (redis-benchmark)", unit, values)
            piped = Figure(f"Redis ceiling: {what}, pipelined -P {PIPELINE}", unit, values)
            ceilings[values] = (unpiped, piped)
            jobs.append((unpiped, self.ceiling_job(RANDOM_NAME, STREAMS, 1, values)))
            jobs.append((piped, self.ceiling_job(RANDOM_NAME, STREAMS, PIPELINE, values)))
        single = Figure("service: push 1 value, 16 streams", "req/s", ceilings=ceilings[1])
        single.notes = "one push per request"
        jobs.append((single, self.wrk_job("post.lua", [str(STREAMS), str(self.bodies["one"])])))
        for entries, values in BULKS:
            bulk = Figure(
                f"service: bulk ingest, {entries:,} streams x {values} value{'s' * (values > 1)} "
                "per request",
                "values/s",
                per_call=entries * values,
                ceilings=ceilings[values],
            )
            bulk.notes = f"{entries:,} script calls per request, pipelined"
            body = self.bodies[f"bulk-{entries}x{values}"]
            jobs.append((bulk, self.wrk_job("bulk.lua", [str(body)], self.bulk_wrk)))
        self.rounds(jobs)
        return [figure for figure, _ in jobs]

    def hot_key(self) -> list[Figure]:
        clients = self.args.clients
        approaches = {
            "Lua (the service's EVALSHA)": (
                self.push.head.bind(HOT)[3],
                lua(self.push.bind(HOT, ["1.5"])),
            ),
            "WATCH/MULTI/EXEC, optimistic": ("alt:{hot}:optimistic", optimistic),
            "GET/compute/SET, non-atomic": ("alt:{hot}:naive", naive),
        }
        figures = {
            name: Figure(f"one hot key, {clients} clients: {name}", "updates/s")
            for name in approaches
        }
        self.redis_flush()
        for number in range(self.args.rounds):
            for name, (key, update) in approaches.items():
                progress(f"round {number + 1}/{self.args.rounds}: hot key, {name}")
                result = asyncio.run(
                    hot_key(self.redis.port, name, key, update, clients, self.args.duration)
                )
                figures[name].hot.append(result)
        lua_rate = figures["Lua (the service's EVALSHA)"].throughput
        for figure in figures.values():
            updates = sum(r.updates for r in figure.hot)
            lost = sum(r.lost for r in figure.hot)
            retries = sum(r.retries for r in figure.hot)
            notes = [f"lost {lost:,} of {updates:,} updates ({lost / updates:.0%})"]
            if retries:
                notes.append(f"{retries:,} retries ({retries / updates:.1f} per update)")
            if figure.throughput != lua_rate:
                notes.append(f"Lua does {lua_rate / figure.throughput:.1f}x this")
            figure.notes = "; ".join(notes)
        return list(figures.values())

    def million(self) -> list[Figure]:
        count = self.args.streams
        progress("memory: one stream after the worked example")
        self.redis_flush()
        self.worked_example_memory()
        progress(f"creating {count:,} streams with the service's push script (redis-cli --pipe)")
        self.redis_flush()
        with self.redis.client() as client:
            before = int(client.info("memory")["used_memory"])
        self.create_streams(count)
        with self.redis.client() as client:
            after = int(client.info("memory")["used_memory"])
            keys = int(client.dbsize())
            sample = [stream_name(i * (count // 100)) for i in range(100)]
            sample_fields = client.hgetall(self.push.head.bind(sample[1])[3])
            usage = [
                int(client.memory_usage(self.push.head.bind(n)[3], samples=0) or 0) for n in sample
            ]
        if keys != count:
            raise BenchError(f"expected {count:,} streams, Redis holds {keys:,} keys")
        per_stream = (after - before) / count
        self.memory["per_stream"] = f"{per_stream:.0f}"
        self.memory["memory_usage_avg"] = f"{statistics.mean(usage):.0f}"
        self.memory["sample_fields"] = " ".join(f"{k}={v}" for k, v in sample_fields.items())
        self.memory["sample_payload"] = str(sum(len(k) + len(v) for k, v in sample_fields.items()))
        one = Figure("service: push 1 value, always the same stream", "req/s")
        spread = Figure(f"service: push 1 value, a random one of {count:,} streams", "req/s")
        fixed = Figure("Redis ceiling: EVALSHA, always the same stream", "calls/s")
        random = Figure(f"Redis ceiling: EVALSHA, a random one of {count:,} streams", "calls/s")
        self.rounds(
            [
                (one, self.wrk_job("post.lua", ["1", str(self.bodies["one"])])),
                (spread, self.wrk_job("spread.lua", [str(count), str(os.getpid())])),
                (fixed, self.ceiling_job(HOT, 1, 1)),
                (random, self.ceiling_job(RANDOM_NAME, count, 1)),
            ]
        )
        spread.notes = f"{spread.throughput / one.throughput:.2f} of one stream's throughput"
        random.notes = f"{random.throughput / fixed.throughput:.2f} of one stream's throughput"
        return [one, spread, fixed, random]

    def worked_example_memory(self) -> None:
        post(self.service.url, "/v1/streams/v1", {"decay": 0.99, "initial": 0}, method="PUT")
        for body in (
            {"value": 5, "num_updates": 0},
            {"value": 10, "num_updates": 10000},
            {"value": 10, "num_updates": 10000},
        ):
            state = post(self.service.url, "/v1/streams/v1/values", body)
        if state.get("value") != 4.60945:
            raise BenchError(f"the worked example gave {state}")
        key = self.push.head.bind("v1")[3]
        with self.redis.client() as client:
            self.memory["example_bytes"] = str(client.memory_usage(key, samples=0))
            self.memory["example_encoding"] = str(client.object("encoding", key))
            fields = client.hgetall(key)
        self.memory["example_fields"] = " ".join(f"{k}={v}" for k, v in fields.items())
        self.memory["example_payload"] = str(sum(len(k) + len(v) for k, v in fields.items()))

    def create_streams(self, count: int) -> None:
        """`count` streams, each created by one push of CREATE_VALUES with the service's own
        EVALSHA: the second value gives the shadows a full 17 significant digits, as a stream
        has after a while."""
        path = self.workdir / "create.resp"
        with path.open("wb") as out:
            for start in range(0, count, 10_000):
                chunk = []
                for index in range(start, min(count, start + 10_000)):
                    chunk.append(resp(self.push.bind(stream_name(index), CREATE_VALUES)))
                out.write(b"".join(chunk))
        with path.open("rb") as stdin:
            done = subprocess.run(
                ["redis-cli", "-p", str(self.redis.port), "--pipe"],
                stdin=stdin,
                capture_output=True,
                text=True,
                check=False,
            )
        if done.returncode != 0 or "errors: 0," not in done.stdout:
            raise BenchError(f"redis-cli --pipe failed:\n{done.stdout}\n{done.stderr}")
        path.unlink()

    def redis_flush(self) -> None:
        with self.redis.client() as client:
            client.flushall()


def post(url: str, path: str, body: object, method: str = "POST") -> dict[str, object]:
    if isinstance(body, tuple):
        body = {"values": list(body)}
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        method=method,
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            reply: dict[str, object] = json.load(response)
    except OSError as error:
        raise BenchError(f"{method} {url}{path}: {error}") from error
    return reply


# --- the report --------------------------------------------------------------------------------


def table(figures: list[Figure]) -> str:
    columns = ["figure", "throughput (median)", "±", "p50 ms", "p99 ms", "÷ ceiling"]
    columns += [f"÷ ceiling -P {PIPELINE}", "notes"]
    rows = []
    for figure in figures:
        ratio = ratio_piped = ""
        if figure.ceilings:
            ceiling, piped = figure.ceilings
            ratio = f"{figure.throughput / ceiling.throughput:.2f}"
            ratio_piped = f"{figure.throughput / piped.throughput:.2f}"
        notes = figure.notes
        if figure.errors:
            notes = f"{figure.errors} errors; " + notes
        rows.append(
            [
                figure.label,
                f"{figure.throughput:,.0f} {figure.unit}",
                f"{figure.spread:.0%}",
                f"{figure.p50:.2f}",
                f"{figure.p99:.2f}",
                ratio,
                ratio_piped,
                notes,
            ]
        )
    return markdown_table(columns, rows, "lrrrrrrl")


def report(bench: Bench, parts: dict[str, list[Figure]]) -> str:
    args = bench.args
    memory = bench.memory
    lines = [
        *header_lines("scale.py"),
        f"- machine: {machine()}",
        f"- app: commit {app_version()}; {bench.workers} uvicorn worker(s); redis-server with "
        "persistence off",
        f"- {args.rounds} interleaved round(s) of {args.duration}s per figure; wrk -t1 "
        f"-c{args.connections} (bulk pushes: -c{args.bulk_connections}); redis-benchmark "
        f"-c {args.connections}; hot key: {args.clients} asyncio clients (redis-py) in one "
        "process",
        f"- the push replayed by redis-benchmark (seen by MONITOR): `{bench.push.show()}`",
        load_line(),
        "",
        table([f for figures in parts.values() for f in figures]),
        "",
        f"Memory: one stream after the worked example takes {memory['example_bytes']} bytes "
        f"(`MEMORY USAGE`, {memory['example_encoding']}; fields {memory['example_payload']} "
        f"bytes of names and values: `{memory['example_fields']}`). With {args.streams:,} "
        f"streams created by one push of two values each (full-precision shadows), Redis' "
        "`used_memory` grew by "
        f"**{memory['per_stream']} bytes per stream** (`MEMORY USAGE` of a sample: "
        f"{memory['memory_usage_avg']} bytes on average). Such a stream's fields, "
        f"{memory['sample_payload']} bytes of names and values: `{memory['sample_fields']}`.",
    ]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, 100,000 streams")
    parser.add_argument("--duration", type=int, help="seconds per measurement (default 3, quick 2)")
    parser.add_argument("--rounds", type=int, help="rounds per figure (default 3, quick 1)")
    parser.add_argument("--warmup", type=int, help="warm up each figure once first: 1 or 0")
    parser.add_argument("--streams", type=int, help="streams for the memory figure (1,000,000)")
    parser.add_argument("--connections", type=int, default=32, help="wrk/redis-benchmark -c")
    parser.add_argument(
        "--bulk-connections", type=int, default=4, help="wrk -c for bulk pushes (default 4)"
    )
    parser.add_argument("--clients", type=int, default=32, help="hot-key clients (default 32)")
    args = parser.parse_args()
    quick = args.quick
    args.duration = args.duration or (2 if quick else 3)
    args.rounds = args.rounds or (1 if quick else 3)
    args.warmup = (0 if quick else 1) if args.warmup is None else args.warmup
    args.streams = args.streams or (100_000 if quick else 1_000_000)
    return args


def main() -> int:
    args = parse_args()

    def measure(workdir: Path, stack: contextlib.ExitStack) -> Callable[[], str]:
        bench = Bench(args, workdir, stack)
        parts = {
            "ceiling": bench.service_against_ceiling(),
            "hot": bench.hot_key(),
            "million": bench.million(),
        }
        return lambda: report(bench, parts)

    return run_bench("scale", measure)


if __name__ == "__main__":
    sys.exit(main())
