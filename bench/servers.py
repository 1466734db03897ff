"""The processes under test: a private redis-server and uvicorn-served HTTP apps on free loopback
ports, each in its own process group so that it and all its workers can be stopped together, and
the CPU time they use."""

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import redis

HOST = "127.0.0.1"
_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A failure the user is told about in one line, after everything has been cleaned up."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Group:
    """A child process started as the leader of a new process group (its own session)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=cwd,
            )
        self.pgid = self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """User + system CPU of every live process in the group (workers included)."""
        return _group_cpu_seconds(self.pgid)

    def connections(self, port: int) -> list[int]:
        """The established connections to `port` that each process of the group holds (the
        processes holding any), most first: how uvicorn's workers shared the clients."""
        return _connections_by_process(self.pgid, port)

    def stop(self, timeout: float = 10.0) -> None:
        stop_all([self], timeout)


def stop_all(groups: Sequence[Group], timeout: float = 10.0) -> None:
    """SIGTERM every group at once, then SIGKILL whatever is left after `timeout`."""
    try:
        for group in groups:
            _signal_group(group.pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for group in groups:
            while time.monotonic() < deadline and (group.running() or _group_alive(group.pgid)):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    group.process.wait(0.05)
    finally:
        # Also reached on a second Ctrl-C during the graceful stop: nothing is left behind.
        for group in groups:
            if _group_alive(group.pgid):
                _signal_group(group.pgid, signal.SIGKILL)
            group.process.wait()


def resp(argv: list[str]) -> bytes:
    """A command in the Redis protocol, as `redis-cli --pipe` reads it."""
    parts = [f"*{len(argv)}\r\n".encode()]
    for arg in argv:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RedisServer(Group):
    """redis-server with persistence off, for the benchmark alone; `wrapper`: the command that
    runs it (valgrind, say)."""

    def __init__(self, directory: Path, wrapper: Sequence[str] = ()) -> None:
        self.port = free_port()
        super().__init__(
            "redis-server",
            [
                *wrapper,
                "redis-server",
                "--port", str(self.port),
                "--bind", HOST,
                "--dir", str(directory),
                "--save", "",
                "--appendonly", "no",
                "--logfile", "",
            ],
            directory / "redis-server.log",
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def client(self) -> "redis.Redis":
        return redis.Redis(
            host=HOST, port=self.port, decode_responses=True, encoding_errors="surrogateescape"
        )

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise BenchError(f"redis-server exited early:\n{self.log_tail()}")
            try:
                with self.client() as client:
                    client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise BenchError(f"redis-server did not answer on port {self.port} in {timeout}s")


class CallgrindRedis(RedisServer):
    """redis-server under valgrind's callgrind: `instructions` runs calls and counts what Redis
    executed meanwhile, a figure no other process on the machine changes. `only`: count just
    what this function executes, callees included (`evalShaCommand`: the script and the
    commands it calls, as `INFO commandstats` times them); None: everything."""

    def __init__(self, directory: Path, only: str | None = None) -> None:
        self.directory = directory
        self.dumps = 0
        toggle = [f"--toggle-collect={only}"] if only else []
        super().__init__(
            directory,
            ["valgrind", "--tool=callgrind", *toggle, f"--callgrind-out-file={directory}/cg.out"],
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        super().wait_ready(timeout)

    def instructions(self, run: Callable[[], object]) -> int:
        subprocess.run(["callgrind_control", "-z", str(self.pgid)], check=True, capture_output=True)
        run()
        subprocess.run(["callgrind_control", "-d", str(self.pgid)], check=True, capture_output=True)
        self.dumps += 1
        dump = self.directory / f"cg.out.{self.dumps}"
        for line in dump.read_text().splitlines():
            if line.startswith("totals:"):
                return int(line.split()[1])
        raise BenchError(f"no totals in {dump}")


class HttpServer(Group):
    """An HTTP app on a free port; ready once GET /healthz answers 200."""

    def __init__(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path
    ) -> None:
        self.port = free_port()
        argv = [part.replace("{port}", str(self.port)) for part in argv]
        env = {key: value.replace("{port}", str(self.port)) for key, value in env.items()}
        super().__init__(name, argv, log, env=env, cwd=cwd)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise BenchError(f"{self.name} exited early:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise BenchError(f"{self.name} did not answer on {self.url} in {timeout}s")


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_stats(pgid: int) -> dict[int, list[str]]:
    """The /proc stat fields after the command of every process in the group, by pid: field 3
    (state) is [0], so pgrp (5) is [2], utime (14) [11] and stime (15) [12]."""
    stats = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # The command is in parentheses and may hold spaces.
        rest = stat[stat.rindex(")") + 2 :].split()
        if int(rest[2]) == pgid:
            stats[int(entry.name)] = rest
    return stats


def _group_cpu_seconds(pgid: int) -> float:
    ticks = sum(int(rest[11]) + int(rest[12]) for rest in _group_stats(pgid).values())
    return ticks / _TICKS_PER_SECOND


def _connections_by_process(pgid: int, port: int) -> list[int]:
    """How many established TCP connections to `port` each process of the group holds, most
    first (from /proc/net/tcp and each process's open sockets)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port, state, inode = (
                    int(fields[1].rsplit(":", 1)[1], 16),
                    fields[3],
                    fields[9],
                )
                if local_port == port and state == "01":  # ESTABLISHED
                    inodes.add(f"socket:[{inode}]")
    counts = []
    for pid in _group_stats(pgid):
        with contextlib.suppress(OSError):
            fds = os.scandir(f"/proc/{pid}/fd")
            held = sum(1 for fd in fds if _readlink(fd.path) in inodes)
            if held:
                counts.append(held)
    return sorted(counts, reverse=True)


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""
