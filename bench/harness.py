"""What every benchmark script shares, so that each one is about its own measurement: the entry
point (tools checked, a temporary folder, every child stopped on errors, Ctrl-C, SIGTERM and
SIGHUP), progress lines on stderr, the load average and how long the run took, the versions
measured, the machine, the report's header lines, the service started on a private Redis,
figures taken in rounds, and markdown tables.

    def main() -> int:
        args = parse_args()
        def measure(workdir: Path, stack: contextlib.ExitStack) -> Callable[[], str]:
            ...  # start processes (stack.callback stops them), measure
            return lambda: report(...)  # printed once every process has stopped
        return harness.main("scale", measure)
"""

import contextlib
import datetime
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType

from loadgen import missing_tools
from servers import BenchError, HttpServer, RedisServer

ROOT = Path(__file__).resolve().parent.parent
# The benchmark's own name in progress lines ("bench", "scale"), set by main().
_NAME = Path(sys.argv[0]).stem
_STARTED = time.monotonic()
_LOAD_BEFORE = ""


def progress(message: str) -> None:
    print(f"[{_NAME} {time.monotonic() - _STARTED:5.1f}s] {message}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def load_line() -> str:
    """The load average when the run started and now, and how long it took: figures measured
    under load are noisier, and the reader should know."""
    return (
        f"- load average before / after: {_LOAD_BEFORE} / {loadavg()}; "
        f"run took {time.monotonic() - _STARTED:.0f}s"
    )


def header_lines(script: str) -> list[str]:
    """The date and the command that made the report."""
    command = shlex.join([".venv/bin/python", f"bench/{script}", *sys.argv[1:]])
    return [
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}",
        f"- command: `{command}`",
    ]


def app_version() -> str:
    """The commit the service runs, and whether app/ differs from it (others may be editing)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("log", "-1", "--format=%h (%ci)")
    if not commit:
        return "unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "app")
    return commit + (" + uncommitted changes to app/" if dirty else "")


def redis_version() -> str:
    """redis-server's version, as `7.0.15`."""
    done = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    )
    return next((p for p in done.stdout.split() if p.startswith("v=")), "v=?")[2:]


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB RAM"
    return (
        f"{len(os.sched_getaffinity(0))} cores ({model or platform.machine()}){memory}, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"redis-server {redis_version()}"
    )


def start_service(
    redis: RedisServer,
    workdir: Path,
    *,
    name: str = "service",
    log: str = "service.log",
    workers: int | None = None,
    env: Mapping[str, str] | None = None,
    checkout: Path = ROOT,
) -> HttpServer:
    """`python -m app` of `checkout` on a free port on `redis`, one uvicorn worker per core
    unless told, none of the caller's EMA_ and REDIS_ variables but those in `env`. Not yet
    ready: wait_ready()."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("EMA_", "REDIS_"))}
    environment |= {
        "REDIS_URL": redis.url,
        "PYTHONUNBUFFERED": "1",
        "EMA_HOST": "127.0.0.1",
        "EMA_PORT": "{port}",
        "EMA_WORKERS": str(workers or len(os.sched_getaffinity(0))),
        **(env or {}),
    }
    # Run from the checkout's folder, whose app/ then comes first on the path.
    return HttpServer(name, [sys.executable, "-m", "app"], environment, checkout, workdir / log)


class Rounds:
    """A figure measured in rounds: its rates (one per round), their median and spread."""

    def rates(self) -> list[float]:
        raise NotImplementedError

    @property
    def throughput(self) -> float:
        return statistics.median(self.rates())

    @property
    def spread(self) -> float:
        """Half the range of the rounds, relative to the median."""
        rates = self.rates()
        throughput = statistics.median(rates)
        return (max(rates) - min(rates)) / 2 / throughput if throughput else 0.0


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[str]], align: str) -> str:
    """`align`: one letter per column, `l` (text) or `r` (numbers)."""
    rule = "".join("---|" if a == "l" else "---:|" for a in align)
    lines = ["| " + " | ".join(columns) + " |", "|" + rule]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def signals_exit() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C does, so that every child is stopped."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(
    name: str,
    measure: Callable[[Path, contextlib.ExitStack], Callable[[], str]],
    tools: Sequence[str] = ("wrk", "redis-benchmark", "redis-server"),
) -> int:
    """Runs `measure(workdir, stack)`, which starts what it measures (registering how to stop
    it on `stack`), measures, and returns the report; the report is printed to stdout once
    every process has stopped; `tools` are the programs it needs on PATH. The exit status: 0,
    1 on a BenchError, 2 when a tool is missing, 130 on Ctrl-C."""
    global _NAME, _LOAD_BEFORE
    _NAME, _LOAD_BEFORE = name, loadavg()
    if problems := missing_tools(tools):
        print("\n".join(f"error: {problem}" for problem in problems), file=sys.stderr)
        return 2
    try:
        with (
            signals_exit(),
            tempfile.TemporaryDirectory(prefix=f"ema-{name}-") as tmp,
            contextlib.ExitStack() as stack,
        ):
            report = measure(Path(tmp), stack)
            progress("done; stopping the servers")
        print(report())
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; every child process was stopped", file=sys.stderr)
        return 130
    except SystemExit:
        print("terminated by a signal; every child process was stopped", file=sys.stderr)
        raise
    return 0
