"""The service at another commit against this checkout's, by CPU per request, in one run.

    .venv/bin/python bench/ab.py REF [--rounds N] [--duration SECONDS] [--batch N] [--subscribers N]
        [--workers N]

Checks REF out in a temporary git worktree, serves both (`python -m app` from each folder, one
uvicorn worker each unless `--workers` says, with a metrics folder as several workers have) on
one private redis-server (each under its own key prefix), and pushes one value and GETs, wrk
-c32, in alternated rounds (every other round in reverse order). Prints each side's CPU per
request (its process's user + system time over its rounds ÷ the requests wrk counted) and
median throughput, and the ratio before ÷ after by CPU: on a shared machine, the figure that
noise changes least.

With `--batch N`, a workload pushes batches of N values (bench/run.py's), and its CPU is per
batch. With `--subscribers N`, a workload pushes one value with N event streams open on each
side (bench/subscribers.py, spread over the pushed streams, opened afresh each round), and each
side's ratio with subscribers ÷ without, by throughput and by CPU, is printed too.
"""

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from harness import ROOT, load_line, markdown_table, progress, start_service
from harness import main as run_bench
from loadgen import WrkLoad
from run import batch_values
from servers import BenchError, HttpServer, RedisServer, stop_all
from subscribers import SubscriberProcess

WORKLOADS = (("push 1 value", "post.lua"), ("GET", "get.lua"))
STREAMS = 16


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("ref", help="the commit to compare with (before)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=int, default=3)
    parser.add_argument(
        "--subscribers", type=int, default=0, help="also push with N event streams open"
    )
    parser.add_argument("--batch", type=int, default=0, help="also push batches of N values")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers per side (1)")
    args = parser.parse_args()
    workloads = list(WORKLOADS)
    if args.batch:
        workloads.insert(1, (f"push a batch of {args.batch:,}", "post.lua"))
    if args.subscribers:  # next to the push without subscribers: the ratio is of rounds close
        workloads.insert(1, (f"push 1 value, {args.subscribers} subscribers", "post.lua"))

    def measure(work: Path, stack: contextlib.ExitStack) -> Callable[[], str]:
        before = work / "before"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(before), args.ref],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        stack.callback(
            lambda: subprocess.run(
                ["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False
            )
        )
        redis = RedisServer(work)
        stack.callback(redis.stop)
        redis.wait_ready()
        servers: dict[str, HttpServer] = {}
        stack.callback(lambda: stop_all(list(servers.values())))
        for label, checkout in (("before", before), ("after", ROOT)):
            metrics = work / f"metrics-{label}"
            metrics.mkdir()
            env = {"EMA_KEY_PREFIX": f"{label}:", "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
            servers[label] = start_service(
                redis,
                work,
                name=label,
                log=f"{label}.log",
                workers=args.workers,
                env=env,
                checkout=checkout,
            )
        for server in servers.values():
            server.wait_ready()
        body = work / "body.json"
        body.write_text(json.dumps({"value": 1.5}))
        batch = work / "batch.json"
        batch.write_text(json.dumps({"values": batch_values(args.batch)}))
        wrk = WrkLoad(1, 32)
        for server in servers.values():  # the streams exist before the first GET
            wrk.run(server.url, "post.lua", [str(STREAMS), str(body)], 1)
        names = [f"s{index:012d}" for index in range(STREAMS)]  # as post.lua names them
        rows = []
        per_workload: dict[str, dict[str, tuple[float, float]]] = {}
        for workload, script in workloads:
            pushed = batch if "batch" in workload else body
            script_args = [str(STREAMS), str(pushed)] if script == "post.lua" else [str(STREAMS)]
            cpu = dict.fromkeys(servers, 0.0)
            calls = dict.fromkeys(servers, 0)
            rates: dict[str, list[float]] = {label: [] for label in servers}
            for round_ in range(args.rounds):
                progress(f"{workload}: round {round_ + 1} of {args.rounds}")
                order = list(servers.items())
                for label, server in order if round_ % 2 == 0 else order[::-1]:
                    subscribers = None
                    if "subscribers" in workload:
                        subscribers = SubscriberProcess(server.url, names, args.subscribers)
                    try:
                        used = server.cpu_seconds()
                        result = wrk.run(server.url, script, script_args, args.duration)
                        if subscribers is not None:
                            subscribers.finish()  # the updates still on their way, counted
                        cpu[label] += server.cpu_seconds() - used
                    finally:
                        if subscribers is not None:
                            subscribers.kill()
                    calls[label] += result.calls
                    rates[label].append(result.calls_per_second)
                    if result.errors:
                        raise BenchError(f"{label}: {result.errors} errors on {workload}")
            per = {label: cpu[label] * 1e6 / max(calls[label], 1) for label in servers}
            per_workload[workload] = {
                label: (per[label], statistics.median(rates[label])) for label in servers
            }
            rows.append(
                [
                    workload,
                    f"{per['before']:,.0f}",
                    f"{per['after']:,.0f}",
                    f"{per['before'] / per['after']:.2f}",
                    f"{statistics.median(rates['before']):,.0f}",
                    f"{statistics.median(rates['after']):,.0f}",
                ]
            )
        columns = ["workload", "CPU µs/req before", "after", "÷ by CPU", "req/s before", "after"]
        head = (
            f"before: {args.ref}; after: this checkout; {args.rounds} alternated rounds of "
            f"{args.duration}s, wrk -c32, {args.workers} uvicorn worker(s) per side\n{load_line()}"
        )
        table = markdown_table(columns, rows, "lrrrrr")
        if args.subscribers:
            alone, crowded = per_workload[workloads[0][0]], per_workload[workloads[1][0]]
            table += "\n\n" + markdown_table(
                [f"side: {args.subscribers} subscribers ÷ none", "by throughput", "by CPU"],
                [
                    [
                        label,
                        f"{crowded[label][1] / alone[label][1]:.2f}",
                        f"{alone[label][0] / crowded[label][0]:.2f}",
                    ]
                    for label in servers
                ],
                "lrr",
            )
        return lambda: head + "\n\n" + table

    return run_bench("ab", measure)


if __name__ == "__main__":
    sys.exit(main())
