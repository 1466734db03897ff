"""What the arithmetic modes and the spread cost inside Redis: push.lua's time per call, from
Redis' own counter (INFO commandstats, usec_per_call of EVALSHA), for fixed-decay streams in each
arithmetic, and, with --baseline REV, for the script as it was at that git revision (before the
spread, say). Rounds interleave the variants so that load drifts hit them alike; the table gives
each variant's fastest round (the least disturbed by other processes on a shared machine) and its
ratio to the default arithmetic in the same run (throughput: default's time / variant's time, so
above 1 is faster).

    .venv/bin/python -m bench.arithmetic                      # single values and batches of 100
    .venv/bin/python -m bench.arithmetic --baseline 03b7e1d   # and the script at that revision
    .venv/bin/python -m bench.arithmetic --callgrind          # instructions, not time

With --callgrind, redis-server runs under valgrind's callgrind and the table counts the
instructions Redis executes per call (counters zeroed after a warm-up, dumped after the calls):
no other process on the machine changes that figure.
"""

import argparse
import os
import random
import subprocess
import tempfile
from pathlib import Path

import redis

from app.codec import config_fields, encode_fields, number
from app.models import StreamConfig
from app.scripts import load_source
from bench.servers import CallgrindRedis, RedisServer, stop_all

ROOT = Path(__file__).resolve().parent.parent


def call_args(fields: dict[str, str], samples: list[tuple[float, int]]) -> list[str]:
    args = ["1", encode_fields(fields), "", "0", "", "60", "3"]
    for value, step in samples:
        args += [number(value), str(step), ""]
    return args


def measure(
    client: "redis.Redis",
    sha: str,
    key: str,
    fields: dict[str, str],
    batch: int,
    calls: int,
    rng: random.Random,
) -> float:
    """Microseconds per EVALSHA, as Redis counts them."""
    client.delete(key, key + ":history")
    client.config_resetstat()
    pipe = client.pipeline(transaction=False)
    for i in range(calls):
        samples = [
            (rng.choice([-1, 1]) * 10 ** rng.uniform(-3, 6), i * batch + k) for k in range(batch)
        ]
        pipe.evalsha(sha, 2, key, key + ":history", *call_args(fields, samples))
        if len(pipe) == 100:
            pipe.execute()
    pipe.execute()
    stats = client.info("commandstats")["cmdstat_evalsha"]
    assert stats["calls"] == calls, stats
    return float(stats["usec_per_call"])


def count(
    server: CallgrindRedis,
    client: "redis.Redis",
    sha: str,
    fields: dict[str, str],
    batch: int,
    calls: int,
    rng: random.Random,
) -> float:
    """Instructions per EVALSHA, in Redis, on a stream warmed up by a few calls."""
    key = "bench:{s}"
    client.delete(key, key + ":history")
    measure(client, sha, key, fields, batch, 3, rng)
    samples = [
        [(rng.choice([-1, 1]) * 10 ** rng.uniform(-3, 6), i * batch + k) for k in range(batch)]
        for i in range(calls)
    ]

    def run() -> None:
        pipe = client.pipeline(transaction=False)
        for chunk in samples:
            pipe.evalsha(sha, 2, key, key + ":history", *call_args(fields, chunk))
        pipe.execute()

    return server.instructions(run) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="also time push.lua as it was at this git revision")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=3000, help="calls per round (single values)")
    parser.add_argument("--callgrind", action="store_true", help="count instructions instead")
    args = parser.parse_args()

    scripts = {"now": load_source("push")}
    if args.baseline:
        scripts["baseline"] = subprocess.run(
            ["git", "show", f"{args.baseline}:app/lua/push.lua"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    variants = [("float64", "now"), ("tensorflow-float64", "now"), ("tensorflow-float32", "now")]
    if args.baseline:
        variants.append(("float64", "baseline"))

    if args.callgrind:
        callgrind(scripts, variants, args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        try:
            server.wait_ready()
            client = server.client()
            shas = {name: client.script_load(source) for name, source in scripts.items()}
            rng = random.Random(1)
            print(
                f"load average {os.getloadavg()[0]:.2f}; fastest of {args.rounds} rounds, "
                "microseconds per EVALSHA (INFO commandstats)"
            )
            print(f"{'stream':<34}{'batch':>6}{'us/call':>10}{'vs float64':>12}")
            for batch, calls in [(1, args.calls), (100, max(1, args.calls // 20))]:
                times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
                for _ in range(args.rounds):
                    for arithmetic, script in variants:
                        config = StreamConfig(decay=0.99, initial=0.0, arithmetic=arithmetic)
                        times[(arithmetic, script)].append(
                            measure(
                                client,
                                shas[script],
                                "bench:{s}",
                                config_fields(config),
                                batch,
                                calls,
                                rng,
                            )
                        )
                default = min(times[("float64", "now")])
                for (arithmetic, script), samples in times.items():
                    label = arithmetic + (
                        f" (push.lua at {args.baseline})" if script == "baseline" else ""
                    )
                    best = min(samples)
                    print(f"{label:<34}{batch:>6}{best:>10.2f}{default / best:>12.2f}")
            client.close()
        finally:
            stop_all([server])


def callgrind(
    scripts: dict[str, str], variants: list[tuple[str, str]], args: argparse.Namespace
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = CallgrindRedis(Path(tmp))
        try:
            server.wait_ready()
            client = server.client()
            shas = {name: client.script_load(source) for name, source in scripts.items()}
            rng = random.Random(1)
            print("instructions Redis executes per EVALSHA (callgrind)")
            print(f"{'stream':<34}{'batch':>6}{'instr/call':>12}{'vs float64':>12}")
            for batch, calls in [(1, 200), (100, 20)]:
                counts = {}
                for arithmetic, script in variants:
                    config = StreamConfig(decay=0.99, initial=0.0, arithmetic=arithmetic)
                    counts[(arithmetic, script)] = count(
                        server, client, shas[script], config_fields(config), batch, calls, rng
                    )
                default = counts[("float64", "now")]
                for (arithmetic, script), instructions in counts.items():
                    label = arithmetic + (
                        f" (push.lua at {args.baseline})" if script == "baseline" else ""
                    )
                    print(
                        f"{label:<34}{batch:>6}{instructions:>12,.0f}"
                        f"{default / instructions:>12.2f}"
                    )
            client.close()
        finally:
            stop_all([server])


if __name__ == "__main__":
    main()
