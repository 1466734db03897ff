"""What subscribers cost the service, alone: the pushes go straight to Redis (redis-benchmark
running the service's own EVALSHA), so the service does nothing but hear each announcement,
render it and write it to its subscribers. Its CPU per push is the fan-out's cost, with no HTTP
request in the figure (and none of the noise that requests bring on a shared machine).

    .venv/bin/python bench/fanout.py [--workers N] [--subscribers N] [--pushes N] [--rounds N]

The subscribers are bench/subscribers.py's process, spread over 16 streams; each round sends
`--pushes` pushes over them (an equal share to each, by one redis-benchmark per stream), waits
for the updates still on their way, and charges the service the CPU it used meanwhile (all its
processes). The run fails unless the subscribers got every update exactly once. With two
workers or more, every worker holding a subscriber of a stream hears and renders each of its
updates: how the kernel shared the subscribers among the workers is printed with the figures.
"""

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from capture import PushCall, push_call, watch
from harness import load_line, markdown_table, progress, start_service
from harness import main as run_bench
from servers import HOST, BenchError, RedisServer
from subscribers import SubscriberProcess, Tally

STREAMS = 16


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers (default 1)")
    parser.add_argument("--subscribers", type=int, default=100, help="event streams (100)")
    parser.add_argument("--pushes", type=int, default=100_000, help="per round (100,000)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    def measure(work: Path, stack: contextlib.ExitStack) -> Callable[[], str]:
        redis = RedisServer(work)
        stack.callback(redis.stop)
        redis.wait_ready()
        service = start_service(redis, work, workers=args.workers)
        stack.callback(service.stop)
        service.wait_ready()
        names = [f"s{index:012d}" for index in range(STREAMS)]
        values = ("12.375", "23.625")
        pushed = watch(
            redis.port, lambda: _post(service.url, names[0], f'{{"values": [{",".join(values)}]}}')
        )
        call = push_call(pushed, names[0], values)
        keys = [call.head.bind(name)[3] for name in names]  # KEYS[1]: the stream's hash
        subscribers = SubscriberProcess(service.url, names, args.subscribers)
        stack.callback(subscribers.kill)
        shares = service.connections(service.port)
        counts_before = _counts(redis, keys)
        per_push, rates = [], []
        for round_ in range(1, args.rounds + 1):
            progress(f"round {round_} of {args.rounds}: {args.pushes:,} pushes")
            used = service.cpu_seconds()
            rates.append(_push(redis.port, call, names, args.pushes // STREAMS))
            _quiet(service.cpu_seconds)  # the updates still on their way
            per_push.append((service.cpu_seconds() - used) * 1e6 / args.pushes)
        tally = subscribers.finish()
        pushes = args.pushes // STREAMS * STREAMS * args.rounds
        # Stream i has the subscribers j < N with j % 16 == i (bench/subscribers.py).
        counts_after = _counts(redis, keys)
        pushed_to = [a - b for b, a in zip(counts_before, counts_after, strict=True)]
        expected = sum(
            pushed_to[i] * len(range(i, args.subscribers, STREAMS)) for i in range(STREAMS)
        )
        if sum(pushed_to) != pushes or tally.events != expected:
            raise BenchError(f"the subscribers got {tally.events:,} updates of {expected:,}")
        return lambda: _report(args, shares, per_push, rates, tally, pushes)

    return run_bench("fanout", measure, tools=("redis-benchmark", "redis-server"))


def _push(port: int, call: PushCall, names: list[str], each: int) -> float:
    """`each` pushes of one value to every stream, by one redis-benchmark per stream (2
    clients each: 32 in all) all at once; the pushes per second. (One redis-benchmark with -r
    would draw each name of a call apart: pushed to one stream, announced on another.)"""
    started = time.monotonic()
    runs = [
        subprocess.Popen(
            ["redis-benchmark", "-h", HOST, "-p", str(port), "-c", "2", "-n", str(each), "-q",
             *call.bind(name, ["1.5"])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]  # fmt: skip
    failed = [run.communicate()[1] for run in runs if run.wait() != 0]
    if failed:
        raise BenchError(f"redis-benchmark failed: {failed[0]}")
    return each * len(names) / (time.monotonic() - started)


def _counts(redis: RedisServer, keys: list[str]) -> list[int]:
    with redis.client() as client:
        return [int(client.hget(key, "n") or 0) for key in keys]


def _post(url: str, name: str, body: str) -> None:
    request = urllib.request.Request(
        f"{url}/v1/streams/{name}/values",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        if response.status != 200:
            raise BenchError(f"a push answered {response.status}")


def _quiet(cpu_seconds: Callable[[], float], interval: float = 0.2) -> None:
    """Until the service stops using CPU: its fan-out has caught up."""
    before = cpu_seconds()
    while True:
        time.sleep(interval)
        now = cpu_seconds()
        if now - before < 0.01 * interval:
            return
        before = now


def _report(
    args: argparse.Namespace,
    shares: list[int],
    per_push: list[float],
    rates: list[float],
    tally: Tally,
    pushes: int,
) -> str:
    rows = [
        [
            "uvicorn workers; subscribers each held",
            f"{args.workers}; {' / '.join(map(str, shares))}",
        ],
        [
            "pushes per round (one redis-benchmark -c 2 per stream, the service's EVALSHA)",
            f"{args.pushes // STREAMS * STREAMS:,}",
        ],
        ["pushes/s per round", ", ".join(f"{rate:,.0f}" for rate in rates)],
        ["service CPU µs per push, per round", ", ".join(f"{cpu:.1f}" for cpu in per_push)],
        ["**service CPU µs per push** (median)", f"**{statistics.median(per_push):.1f}**"],
        [
            f"updates delivered per push (expected {args.subscribers / STREAMS:.2f})",
            f"{tally.events / pushes:.2f}",
        ],
        ["`lagged` events", f"{tally.lagged}"],
    ]
    head = f"{args.subscribers} subscribers over {STREAMS} streams, {args.rounds} rounds"
    return f"{head}\n{load_line()}\n\n" + markdown_table(["figure", "value"], rows, "lr")


if __name__ == "__main__":
    sys.exit(main())
