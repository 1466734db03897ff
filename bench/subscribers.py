"""Pushes with open subscribers: push throughput with N event streams open (spread over the
pushed streams) as a ratio to none, measured in interleaved rounds (in turn without then with,
and with then without), and the delay from push to delivery.

The subscribers run in a child process of their own (`python bench/subscribers.py URL NAMES N
REPORT`): N plain HTTP/1.1 connections on one asyncio loop, each on
`GET /v1/streams/<name>/events`. It prints `ready` once every connection has its `: subscribed`
comment, reads until its standard input closes, then writes the file REPORT, in JSON: events
received, `lagged` events, and the delays. (A file: a report of a few hundred kB printed to a
pipe once arrived cut at 64 KiB.)

The delay of an update is the subscriber's clock when the update arrives minus the update's
`updated_at`, which is Redis' TIME when the push script applied it: both clocks are this
machine's. So it is from the push's application in Redis to its delivery to the client: Pub/Sub,
the service's fan-out, the event stream and the socket. It is taken for the oldest update of
each read (the first), the one that waited longest: reading a number out of every event cost
the subscriber process, which shares the machine's cores with the service, as much CPU as the
rest of its work.

The process runs on uvloop, as the service does: a load generator should take as little of the
machine as it can.
"""

import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

import uvloop
from loadgen import Result
from servers import BenchError, HttpServer

_UPDATED_AT = re.compile(rb'"updated_at":([0-9.eE+-]+)')
_READY_TIMEOUT = 30.0
_QUIET = 0.5
_DRAIN_LIMIT = 15.0
# After the subscribers' process ends: the service closes their event streams meanwhile.
_SETTLE = 1.0


# --- the subscriber process -------------------------------------------------------------------


@dataclass
class Tally:
    events: int = 0
    lagged: int = 0
    delays: list[float] = field(default_factory=list)
    last_read: float = 0.0  # monotonic time of the last bytes received
    cpu_seconds: float = 0.0  # the subscriber process's, while the pushes ran
    seconds: float = 0.0  # how long the pushes ran


class _Subscriber(asyncio.Protocol):
    """One subscriber's connection, its events counted in the callback that receives their
    bytes: through a stream reader, each read would wake a future and a task first, which cost
    this process more than the counting."""

    def __init__(self, request: bytes, name: str, tally: Tally, ready: asyncio.Queue[str]) -> None:
        self._request = request
        self._name = name
        self._tally = tally
        self._ready = ready
        self._buffer = b""
        self._in_head = True
        self._subscribed = False
        self._transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        tally = self._tally
        tally.last_read = time.monotonic()
        buffer = self._buffer + data
        if self._in_head:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self._buffer = buffer
                return
            head, buffer = buffer[:end], buffer[end + 4 :]
            self._in_head = False
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                self._end(RuntimeError(f"{self._name}: {head.decode(errors='replace')}"))
                return
        # Whole events only (chunked framing sits between them, never inside one).
        cut = buffer.rfind(b"\n\n")
        if cut < 0:
            self._buffer = buffer
            return
        complete, self._buffer = buffer[: cut + 2], buffer[cut + 2 :]
        if not self._subscribed and b": subscribed" in complete:
            self._subscribed = True
            self._ready.put_nowait(self._name)
        tally.events += complete.count(b"event: update")
        tally.lagged += complete.count(b"event: lagged")
        oldest = _UPDATED_AT.search(complete)
        if oldest is not None:
            tally.delays.append(now - float(oldest[1]))

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc)

    def _end(self, error: Exception | None) -> None:
        if not self.closed.done():
            if error is None:
                self.closed.set_result(None)
            else:
                self.closed.set_exception(error)
        if self._transport is not None:
            self._transport.close()


async def _subscribe(
    host: str, port: int, name: str, tally: Tally, ready: asyncio.Queue[str]
) -> None:
    request = (
        f"GET /v1/streams/{name}/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Accept: text/event-stream\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    transport, subscriber = await loop.create_connection(
        lambda: _Subscriber(request, name, tally, ready), host, port
    )
    try:
        await subscriber.closed
    finally:
        transport.close()


async def _subscribers(url: str, names: list[str], count: int) -> Tally:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    tally = Tally()
    ready: asyncio.Queue[str] = asyncio.Queue()
    # One after another, as subscribers arriving over time do: opened all at once, most land
    # on whichever worker wakes first, and fewer workers hear each stream.
    tasks: list[asyncio.Task[None]] = []
    for i in range(count):
        subscriber = _subscribe(host, port, names[i % len(names)], tally, ready)
        tasks.append(asyncio.create_task(subscriber))
        getter = asyncio.ensure_future(ready.get())
        done, _ = await asyncio.wait(
            [getter, *tasks], timeout=_READY_TIMEOUT, return_when="FIRST_COMPLETED"
        )
        if getter not in done:
            getter.cancel()
            failed = [task for task in tasks if task.done()]
            raise RuntimeError(failed[0].exception() if failed else "subscribers not ready in time")
    print("ready", flush=True)
    # Until the parent closes our stdin (the pushes are over), then until what is still on its
    # way has arrived: nothing for _QUIET seconds.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    deadline = time.monotonic() + _DRAIN_LIMIT
    while (now := time.monotonic()) < deadline:
        quiet_for = now - tally.last_read
        if quiet_for >= _QUIET:
            break
        await asyncio.sleep(_QUIET - quiet_for)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return tally


def subscriber_main(argv: Sequence[str]) -> None:
    url, names, count, report = argv[0], argv[1].split(","), int(argv[2]), Path(argv[3])
    tally = uvloop.run(_subscribers(url, names, count))
    figures = {"events": tally.events, "lagged": tally.lagged, "delays": tally.delays}
    report.write_text(json.dumps(figures))


# --- driving it from bench/run.py -------------------------------------------------------------


class SubscriberProcess:
    """The child process holding `count` event streams open, spread over `names`."""

    def __init__(self, url: str, names: Sequence[str], count: int) -> None:
        descriptor, report = tempfile.mkstemp(prefix="subscribers-", suffix=".json")
        os.close(descriptor)
        self.report = Path(report)
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__)), url, ",".join(names), str(count), report],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if line != "ready":
            self.process.kill()
            raise BenchError(f"the subscribers did not start: {line or self.process.wait()}")
        self.started = time.monotonic()
        self.cpu_before = self.cpu_seconds()

    def cpu_seconds(self) -> float:
        """User + system CPU of the subscriber process so far, from /proc."""
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def finish(self) -> Tally:
        assert self.process.stdin is not None
        cpu, seconds = self.cpu_seconds() - self.cpu_before, time.monotonic() - self.started
        self.process.stdin.close()
        if self.process.wait(_DRAIN_LIMIT + 10) != 0:
            raise BenchError(f"the subscriber process failed ({self.process.returncode})")
        report = json.loads(self.report.read_text())
        tally = Tally(report["events"], report["lagged"], report["delays"])
        tally.cpu_seconds, tally.seconds = cpu, seconds
        return tally

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.report.unlink(missing_ok=True)


@dataclass
class SubscriberFigures:
    subscribers: int
    streams: int
    without: list[Result] = field(default_factory=list)
    with_subscribers: list[Result] = field(default_factory=list)
    tallies: list[Tally] = field(default_factory=list)
    # Per round, how many subscribers each worker held: every worker with a subscriber of a
    # stream hears and renders all of its updates, so an even share costs the most.
    shares: list[list[int]] = field(default_factory=list)
    paced: Result | None = None
    paced_tally: Tally | None = None
    cpu_without: float = 0.0  # the service's CPU seconds over the rounds, all its processes
    cpu_with: float = 0.0

    def ratio(self) -> float:
        rate = statistics.median(r.calls_per_second for r in self.with_subscribers)
        return rate / statistics.median(r.calls_per_second for r in self.without)

    def cpu_per_push(self, results: list[Result], seconds: float) -> float:
        return seconds * 1e6 / max(sum(r.calls for r in results), 1)

    def table(self) -> str:
        cpu_without = self.cpu_per_push(self.without, self.cpu_without)
        cpu_with = self.cpu_per_push(self.with_subscribers, self.cpu_with)
        events = sum(tally.events for tally in self.tallies)
        lagged = sum(tally.lagged for tally in self.tallies)
        pushes = sum(r.calls for r in self.with_subscribers)
        shares = "; ".join(" / ".join(map(str, share)) for share in self.shares)

        def rates(results: list[Result]) -> str:
            return ", ".join(f"{r.calls_per_second:,.0f}" for r in results)

        rows = [
            "| figure | value |",
            "|---|---:|",
            f"| push 1 value, req/s per round, no subscribers | {rates(self.without)} |",
            f"| push 1 value, req/s per round, {self.subscribers} subscribers | "
            f"{rates(self.with_subscribers)} |",
            f"| **ratio with {self.subscribers} subscribers ÷ none** (median of rounds) | "
            f"**{self.ratio():.2f}** |",
            f"| service CPU µs per push, no subscribers / {self.subscribers} subscribers | "
            f"{cpu_without:,.0f} / {cpu_with:,.0f} |",
            f"| ratio by CPU (none ÷ with: what the throughput ratio would be where the service "
            f"is the bottleneck) | {cpu_without / max(cpu_with, 1e-9):.2f} |",
            f"| push p50 / p99 ms, no subscribers | {_latency(self.without)} |",
            f"| push p50 / p99 ms, {self.subscribers} subscribers | "
            f"{_latency(self.with_subscribers)} |",
            f"| updates delivered per push (expected {self.subscribers / self.streams:.2f}) | "
            f"{events / max(pushes, 1):.2f} |",
            f"| `lagged` events (a subscriber fell behind) | {lagged} |",
            f"| subscribers per worker, per round (uvicorn's workers share the connections as "
            f"the kernel hands them out) | {shares} |",
            f"| CPU of the subscriber process (it shares the machine), % of one core | "
            f"{_cpu(self.tallies):.0%} |",
            f"| push to delivery p50 / p99 / max ms (the oldest update of each read), pushing "
            f"flat out | {_delays(self.tallies)} |",
        ]
        if self.paced is not None and self.paced_tally is not None:
            rows.append(
                f"| **push to delivery p50 / p99 / max ms**, at {self.paced.calls_per_second:,.0f} "
                f"pushes/s (paced) | **{_delays([self.paced_tally])}** |"
            )
        return "\n".join(rows)


def _cpu(tallies: list[Tally]) -> float:
    return sum(t.cpu_seconds for t in tallies) / max(sum(t.seconds for t in tallies), 1e-9)


def _delays(tallies: list[Tally]) -> str:
    delays = sorted(delay for tally in tallies for delay in tally.delays)
    if not delays:
        return "none received"

    def at(p: float) -> float:
        return delays[min(len(delays) - 1, int(p * len(delays)))] * 1e3

    return f"{at(0.5):.2f} / {at(0.99):.2f} / {delays[-1] * 1e3:.2f}"


def _latency(results: list[Result]) -> str:
    p50 = statistics.median(r.p50_ms for r in results)
    p99 = statistics.median(r.p99_ms for r in results)
    return f"{p50:.2f} / {p99:.2f}"


def measure(
    server: HttpServer,
    names: Sequence[str],
    count: int,
    rounds: int,
    push: Callable[[], Result],
    paced: Callable[[], Result],
    reset: Callable[[], None],
    progress: Callable[[str], None],
) -> SubscriberFigures:
    """Rounds of pushes flat out without, then with, `count` subscribers on the pushed streams;
    then the delay to delivery with pushes at a steady, moderate rate."""
    figures = SubscriberFigures(count, len(names))

    def without() -> None:
        reset()
        before = server.cpu_seconds()
        figures.without.append(push())
        figures.cpu_without += server.cpu_seconds() - before

    def with_subscribers() -> None:
        reset()
        subscribers = SubscriberProcess(server.url, names, count)
        try:
            figures.shares.append(server.connections(server.port))
            before = server.cpu_seconds()
            figures.with_subscribers.append(push())
            tally = subscribers.finish()  # waits for the updates still on their way
            figures.cpu_with += server.cpu_seconds() - before
            figures.tallies.append(tally)
        finally:
            subscribers.kill()
        # The service lets go of the closed event streams before anything else is measured.
        time.sleep(_SETTLE)

    for round_ in range(1, rounds + 1):
        progress(f"pushes with {count} subscribers: round {round_} of {rounds}")
        # Alternated, so that a drift of the machine's speed weighs on both figures alike.
        for measure_one in (without, with_subscribers)[:: 1 if round_ % 2 else -1]:
            measure_one()
        if not server.running():
            raise BenchError(f"the service died during the run:\n{server.log_tail()}")
    progress(f"paced pushes with {count} subscribers")
    reset()
    subscribers = SubscriberProcess(server.url, names, count)
    try:
        figures.paced = paced()
        figures.paced_tally = subscribers.finish()
    finally:
        subscribers.kill()
    return figures


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        subscriber_main(sys.argv[1:])
