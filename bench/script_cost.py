"""What a push costs Redis itself: the service's push script against a minimal EMA script (HMGET,
the update, HSET, one formatted reply), as Redis CPU per call from `INFO commandstats`, in one
run against one private redis-server; then bytes per stream at many fixed-decay streams.

    .venv/bin/python bench/script_cost.py            # about 2 minutes, with the memory figure
    .venv/bin/python bench/script_cost.py --streams 0  # CPU only, about a minute
    .venv/bin/python bench/script_cost.py --callgrind  # instructions instead, about a minute

Every figure is EVALSHA's `usec_per_call` (Redis' own clock, the script and the commands it calls)
over `--calls` calls sent in pipelines, after `CONFIG RESETSTAT`. Workloads alternate in
`--rounds` rounds and each ratio is the median of the rounds' ratios, so that load from other
processes moves both sides of a ratio alike. The service's calls are built by the service's own
code (`PushScript.call`, the defaults it passes, the stream configured as `PUT` does), so when
the script or its arguments change, the bench follows. Memory: `used_memory` before and after
creating `--streams` fixed-decay streams (decay 0.99, events on) with one push of three values
each (full-precision numbers and a z-score, as a stream has after a while), divided by their
count.

With --callgrind, redis-server runs under valgrind's callgrind and each figure is the number of
instructions `evalShaCommand` executes per call (the script and the commands it calls, what
`usec_per_call` times): a figure that other processes on the machine do not move, so one round
is enough and there is no memory figure.
"""

import argparse
import contextlib
import random
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
from harness import load_line, markdown_table, progress
from harness import main as run_bench
from servers import BenchError, CallgrindRedis, RedisServer, resp

from app.codec import config_fields
from app.keys import KeyLayout
from app.models import Samples, StreamConfig, Window
from app.scripts import PushScript

STREAMS = 16
# Calls per pipeline: 1, unpipelined, as the service and redis-benchmark send single pushes
# (a pipeline keeps Redis' caches warm and makes every call cheaper, the minimal one most).
PIPELINE = 1
LAYOUT = KeyLayout("ema:")
DEFAULTS = config_fields(StreamConfig(decay=0.99))  # the service's default stream
MINIMAL = """
local s = redis.call('HMGET', KEYS[1], 'v', 'n')
local x = tonumber(ARGV[1])
local v = tonumber(s[1])
if v then v = v - (1 - 0.99) * (v - x) else v = x end
local text = string.format('%.17g', v)
redis.call('HSET', KEYS[1], 'v', text, 'n', (tonumber(s[2]) or 0) + 1)
return text
"""


@dataclass
class Workload:
    label: str
    config: StreamConfig | None  # None: the minimal script
    batch: int = 1
    events: bool = True
    prefill: int = 0  # values pushed to each stream before measuring
    costs: list[float] | None = None  # per call, one per round: µs, or instructions

    def per_value(self) -> list[float]:
        return [c / self.batch for c in self.costs or []]


WORKLOADS = [
    Workload("minimal EMA script", None),
    Workload("fixed-decay stream (events on)", StreamConfig(decay=0.99)),
    Workload("fixed-decay stream, events off", StreamConfig(decay=0.99), events=False),
    Workload(
        "halflife stream with 3 windows",
        StreamConfig(
            halflife=60.0,
            windows=[
                Window(name="5m", halflife=300.0),
                Window(name="1h", halflife=3600.0),
                Window(name="fast", decay=0.9),
            ],
        ),
    ),
    # at its cap, as a stream that has had a history for a while: each push also trims
    Workload(
        "decay stream with history 1,000", StreamConfig(decay=0.99, history=1000), prefill=1000
    ),
    Workload("fixed-decay stream, batches of 100", StreamConfig(decay=0.99), batch=100),
    Workload("fixed-decay stream, batches of 1,000", StreamConfig(decay=0.99), batch=1000),
]


# What one figure is: the cost per call of running `calls` calls (`run`).
Cost = Callable[[Callable[[], None], int], float]


def usec_per_call(client: "redis.Redis") -> Cost:
    def cost(run: Callable[[], None], calls: int) -> float:
        client.config_resetstat()
        run()
        return float(client.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])

    return cost


def instructions_per_call(server: CallgrindRedis) -> Cost:
    return lambda run, calls: server.instructions(run) / calls


def measure(
    client: "redis.Redis", scripts: PushScript, minimal: str, w: Workload, calls: int, cost: Cost
) -> float:
    rng = random.Random(len(w.label))
    client.flushall()
    names = [f"s{i:012d}" for i in range(STREAMS)]
    if w.config is not None:
        for name in names:  # as PUT configures a stream
            client.hset(LAYOUT.stream(name), mapping=dict(config_fields(w.config)))
    calls = max(3, calls // w.batch)

    def send(count: int) -> None:
        with client.pipeline(transaction=False) as pipe:
            for i in range(count):
                name = names[i % STREAMS]
                samples = Samples([rng.uniform(0, 100) for _ in range(w.batch)])
                if w.config is None:
                    pipe.evalsha(minimal, 1, LAYOUT.stream(name), repr(samples.values[0]))
                else:
                    keys, args = scripts.call(
                        (LAYOUT.stream(name), LAYOUT.history(name)),
                        samples,
                        idempotency=None,
                        channel=LAYOUT.channel(name) if w.events else None,
                    )
                    pipe.evalsha(scripts.sha, len(keys), *keys, *args)
                if len(pipe) >= PIPELINE:
                    pipe.execute()
            pipe.execute()

    for name in names if w.prefill else ():
        keys, args = scripts.call(
            (LAYOUT.stream(name), LAYOUT.history(name)),
            Samples([float(i) for i in range(w.prefill)]),
            idempotency=None,
            channel=None,
        )
        client.evalsha(scripts.sha, len(keys), *keys, *args)
    send(STREAMS)  # warm up: the first push to each stream writes its state fields
    return cost(lambda: send(calls), calls)


def bytes_per_stream(client: "redis.Redis", scripts: PushScript, count: int, workdir: Path) -> str:
    client.flushall()
    before = int(client.info("memory")["used_memory"])
    path = workdir / "create.resp"
    with path.open("wb") as out:
        for index in range(count):
            name = f"s{index:012d}"
            keys, args = scripts.call(
                (LAYOUT.stream(name), LAYOUT.history(name)),
                Samples((1.5, 2.718281828459045, 0.1)),
                idempotency=None,
                channel=LAYOUT.channel(name),
            )
            out.write(resp(["EVALSHA", scripts.sha, str(len(keys)), *keys, *args]))
    with path.open("rb") as stdin:
        done = subprocess.run(
            ["redis-cli", "-p", str(client.connection_pool.connection_kwargs["port"]), "--pipe"],
            stdin=stdin,
            capture_output=True,
            text=True,
            check=False,
        )
    path.unlink()
    if done.returncode != 0 or "errors: 0," not in done.stdout:
        raise BenchError(f"redis-cli --pipe failed:\n{done.stdout}\n{done.stderr}")
    after = int(client.info("memory")["used_memory"])
    if client.dbsize() != count:
        raise BenchError(f"expected {count:,} streams, Redis holds {client.dbsize():,} keys")
    key = LAYOUT.stream("s000000000000")
    usage = client.memory_usage(key, samples=0)
    with redis.Redis(port=client.connection_pool.connection_kwargs["port"]) as raw:
        fields = raw.hgetall(key)
    shown = " ".join(f"{k.decode()}=<{len(v)} bytes>" for k, v in fields.items())
    return (
        f"{count:,} fixed-decay streams: used_memory grew by **{(after - before) / count:.0f} "
        f"bytes per stream**; `MEMORY USAGE` of one: {usage} bytes; its fields: {shown}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="values per figure and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--streams", type=int, default=1_000_000, help="0: no memory figure")
    parser.add_argument("--callgrind", action="store_true", help="count instructions instead")
    args = parser.parse_args()
    if args.callgrind:
        args.rounds, args.streams = 1, 0

    def measure_all(workdir: Path, stack: contextlib.ExitStack) -> Callable[[], str]:
        server = CallgrindRedis(workdir, only="evalShaCommand") if args.callgrind else None
        server = server or RedisServer(workdir)
        stack.callback(server.stop)
        server.wait_ready()
        client = stack.enter_context(server.client())
        cost = instructions_per_call(server) if isinstance(server, CallgrindRedis) else None
        cost = cost or usec_per_call(client)
        # The service's own calls (call() needs no async client).
        scripts = PushScript(client, create_with=DEFAULTS, max_clock_skew=3600.0)  # type: ignore[arg-type]
        client.script_load(scripts.source)
        minimal = client.script_load(MINIMAL)
        for round_ in range(args.rounds):
            progress(f"round {round_ + 1} of {args.rounds}")
            for w in WORKLOADS:
                w.costs = [*(w.costs or []), measure(client, scripts, minimal, w, args.calls, cost)]
        memory = bytes_per_stream(client, scripts, args.streams, workdir) if args.streams else ""
        return lambda: report(args, memory)

    callgrind = ("valgrind", "callgrind_control") if args.callgrind else ()
    return run_bench("cost", measure_all, tools=("redis-server", *callgrind))


def report(args: argparse.Namespace, memory: str) -> str:
    floor = WORKLOADS[0].per_value()
    unit, digits = ("instructions", ",.0f") if args.callgrind else ("Redis µs", ".2f")
    rows = []
    for w in WORKLOADS:
        ratios = [v / f for v, f in zip(w.per_value(), floor, strict=True)]
        rows.append(
            [
                w.label,
                f"{statistics.median(w.costs or []):{',.0f' if args.callgrind else '.1f'}}",
                f"{statistics.median(w.per_value()):{digits}}",
                f"{statistics.median(ratios):.2f}",
            ]
        )
    columns = [
        "push", f"{unit} per call", f"{unit.removeprefix('Redis ')} per value",
        "x the minimal script (per value)",
    ]  # fmt: skip
    parts = [
        f"{load_line()}; {args.rounds} round{'s' * (args.rounds > 1)} of {args.calls:,} values "
        "per figure",
        markdown_table(columns, rows, "lrrr"),
    ]
    return "\n\n".join([*parts, memory] if memory else parts)


if __name__ == "__main__":
    sys.exit(main())
