"""The service at another commit against this checkout's, by CPU per request, in one run.

    .venv/bin/python bench/ab.py REF [--rounds N] [--duration SECONDS]

Checks REF out in a temporary git worktree, serves both (`python -m app` from each folder, one
uvicorn worker each, with a metrics folder as several workers have) on one private redis-server
(each under its own key prefix), and pushes one value and GETs, wrk -c32, in alternated rounds
(every other round in reverse order). Prints each side's CPU per request (its process's user +
system time over its rounds ÷ the requests wrk counted) and median throughput, and the ratio
before ÷ after by CPU: on a shared machine, the figure that noise changes least.
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from loadgen import WrkLoad
from servers import BenchError, HttpServer, RedisServer, stop_all

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = (("push 1 value", "post.lua"), ("GET", "get.lua"))
STREAMS = 16


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("ref", help="the commit to compare with (before)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ema-ab-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
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
        for label, folder in (("before", before), ("after", ROOT)):
            metrics = work / f"metrics-{label}"
            metrics.mkdir()
            env = {k: v for k, v in os.environ.items() if not k.startswith("EMA_")}
            env |= {
                "REDIS_URL": redis.url,
                "EMA_PORT": "{port}",
                "EMA_WORKERS": "1",
                "EMA_KEY_PREFIX": f"{label}:",
                "PROMETHEUS_MULTIPROC_DIR": str(metrics),
            }
            argv = [sys.executable, "-m", "app"]
            servers[label] = HttpServer(label, argv, env, folder, work / f"{label}.log")
        for server in servers.values():
            server.wait_ready()
        body = work / "body.json"
        body.write_text(json.dumps({"value": 1.5}))
        wrk = WrkLoad(1, 32)
        for server in servers.values():  # the streams exist before the first GET
            wrk.run(server.url, "post.lua", [str(STREAMS), str(body)], 1)
        print(
            f"before: {args.ref}; after: this checkout; {args.rounds} alternated rounds of "
            f"{args.duration}s, wrk -c32; load average {os.getloadavg()[0]:.1f}"
        )
        print()
        print("| workload | CPU µs/req before | after | ÷ by CPU | req/s before | after |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for workload, script in WORKLOADS:
            script_args = [str(STREAMS), str(body)] if script == "post.lua" else [str(STREAMS)]
            cpu = dict.fromkeys(servers, 0.0)
            calls = dict.fromkeys(servers, 0)
            rates: dict[str, list[float]] = {label: [] for label in servers}
            for round_ in range(args.rounds):
                order = list(servers.items())
                for label, server in order if round_ % 2 == 0 else order[::-1]:
                    used = server.cpu_seconds()
                    result = wrk.run(server.url, script, script_args, args.duration)
                    cpu[label] += server.cpu_seconds() - used
                    calls[label] += result.calls
                    rates[label].append(result.calls_per_second)
                    if result.errors:
                        raise BenchError(f"{label}: {result.errors} errors on {workload}")
            per = {label: cpu[label] * 1e6 / max(calls[label], 1) for label in servers}
            print(
                f"| {workload} | {per['before']:,.0f} | {per['after']:,.0f} | "
                f"{per['before'] / per['after']:.2f} | {statistics.median(rates['before']):,.0f} "
                f"| {statistics.median(rates['after']):,.0f} |"
            )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
