"""The load generators: wrk for HTTP, redis-benchmark for Redis alone, and their output parsed."""

import csv
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from servers import HOST, BenchError

WRK_DIR = Path(__file__).resolve().parent / "wrk"

INSTALL_HINTS = {
    "wrk": "Debian/Ubuntu: `sudo apt-get install -y wrk`; macOS: `brew install wrk`; "
    "or build it from https://github.com/wg/wrk",
    "redis-benchmark": "Debian/Ubuntu: `sudo apt-get install -y redis-tools` (or redis-server); "
    "macOS: `brew install redis`",
    "redis-server": "Debian/Ubuntu: `sudo apt-get install -y redis-server`; "
    "macOS: `brew install redis`",
    "valgrind": "Debian/Ubuntu: `sudo apt-get install -y valgrind`",
    "callgrind_control": "Debian/Ubuntu: `sudo apt-get install -y valgrind` (it ships it)",
}


def missing_tools(tools: Iterable[str] = tuple(INSTALL_HINTS)) -> list[str]:
    """One line per tool of `tools` that is not on PATH, with how to install it."""
    return [
        f"{tool} not found on PATH. Install it: {INSTALL_HINTS[tool]}"
        for tool in tools
        if shutil.which(tool) is None
    ]


@dataclass(frozen=True)
class Result:
    """One measurement: calls are HTTP requests (wrk) or Redis commands (redis-benchmark)."""

    calls: int
    seconds: float
    calls_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int


# --- wrk ---------------------------------------------------------------------------------------

_LATENCY_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
_WRK_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", re.MULTILINE)
_WRK_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_WRK_PERCENTILE = re.compile(r"^\s+(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE)
_WRK_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_WRK_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


@dataclass(frozen=True)
class WrkLoad:
    threads: int
    connections: int

    def run(self, url: str, script: str, args: Sequence[str], seconds: int) -> Result:
        """Run `wrk --latency` with bench/wrk/<script> for `seconds` and parse its report."""
        command = [
            "wrk",
            f"--threads={self.threads}",
            f"--connections={self.connections}",
            f"--duration={seconds}s",
            "--timeout=10s",
            "--latency",
            f"--script={WRK_DIR / script}",
            url,
            "--",
            *args,
        ]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise BenchError(f"wrk failed ({completed.returncode}):\n{completed.stderr}")
        return parse_wrk(completed.stdout)


def parse_wrk(report: str) -> Result:
    total = _WRK_TOTAL.search(report)
    rate = _WRK_RATE.search(report)
    percentiles = {
        int(m[1]): float(m[2]) * _LATENCY_UNITS_MS[m[3]] for m in _WRK_PERCENTILE.finditer(report)
    }
    if total is None or rate is None or 50 not in percentiles or 99 not in percentiles:
        raise BenchError(f"could not parse wrk's report:\n{report}")
    non_2xx = _WRK_NON_2XX.search(report)
    socket = _WRK_SOCKET.search(report)
    errors = (int(non_2xx[1]) if non_2xx else 0) + (
        sum(int(n) for n in socket.groups()) if socket else 0
    )
    return Result(
        calls=int(total[1]),
        seconds=float(total[2]) * _LATENCY_UNITS_MS[total[3]] / 1e3,
        calls_per_second=float(rate[1]),
        p50_ms=percentiles[50],
        p99_ms=percentiles[99],
        errors=errors,
    )


# --- redis-benchmark ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisBenchmark:
    port: int
    clients: int
    keyspace: int  # -r: `__rand_int__` in an argument becomes a 12-digit number below this

    def run(self, command: Sequence[str], calls: int, pipeline: int = 1) -> Result:
        argv = [
            "redis-benchmark",
            "-h", HOST,
            "-p", str(self.port),
            "-c", str(self.clients),
            "-n", str(calls),
            "-r", str(self.keyspace),
            "-P", str(pipeline),
            "--csv",
            *command,
        ]  # fmt: skip
        started = time.monotonic()
        completed = subprocess.run(argv, capture_output=True, text=True, check=False)
        seconds = time.monotonic() - started
        if completed.returncode != 0:
            raise BenchError(
                f"redis-benchmark failed ({completed.returncode}):\n{completed.stderr}"
            )
        rows = list(csv.DictReader(completed.stdout.splitlines()))
        if not rows:
            raise BenchError(f"could not parse redis-benchmark's output:\n{completed.stdout}")
        row = rows[-1]
        return Result(
            calls=calls,
            seconds=seconds,
            calls_per_second=float(row["rps"]),
            p50_ms=float(row["p50_latency_ms"]),
            p99_ms=float(row["p99_latency_ms"]),
            errors=0,
        )

    def calibrate(self, command: Sequence[str], pipeline: int, warmup: float) -> float:
        """Warm up for about `warmup` seconds (0.3 at least, to learn the rate); return the
        rate reached, in calls/s."""
        seconds = max(warmup, 0.3)
        calls = max(200, 4 * self.clients * pipeline)
        result = self.run(command, calls, pipeline)
        spent = result.seconds
        while spent < seconds:
            # Fill the rest of the time at the rate just measured, at least doubling.
            calls = max(2 * calls, int(result.calls_per_second * (seconds - spent)))
            result = self.run(command, calls, pipeline)
            spent += result.seconds
        return result.calls_per_second
