"""`ema`: the EMA service from a terminal.

    ema push cpu 5 --num-updates 0     apply a value (or several: ema push cpu 1 2 3)
    ema get cpu                        a stream's state
    ema ls --prefix cpu.               stream names
    ema watch cpu                      a live line with a sparkline of the average
    ema rm cpu                         delete streams
    ema create cpu --decay 0.99        create or replace a stream's configuration
    ema serve --port 8000              run the service (python -m app)

The service is at --url, else $EMA_URL, else http://127.0.0.1:8000; the API key is --api-key,
else $EMA_API_KEY. Output is for people; --json prints JSON (one object per line for watch).
Errors print one line to stderr and exit 1 (2 for bad arguments, 130 on Ctrl-C).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import asdict, dataclass
from typing import Any, NoReturn, TextIO

import anyio

from ema_client._version import __version__
from ema_client.client import (
    API_KEY_VARIABLE,
    DEFAULT_URL,
    URL_VARIABLE,
    ApiError,
    AsyncClient,
    Client,
    EmaError,
    NotFound,
    State,
    Update,
)

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _UsageError(Exception):
    """Arguments argparse accepts but that do not go together."""


# --- output -----------------------------------------------------------------------------------


def _number(x: float | None) -> str:
    return "-" if x is None else repr(x)


def _short(x: float | None) -> str:
    return "-" if x is None else f"{x:.6g}"


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
    return f"{stamp}.{int(seconds % 1 * 1000):03d}"


def _state_text(state: State) -> str:
    config = state.config
    return "\n".join(
        [
            state.name,
            f"  value       {_number(state.value)}",
            f"  debiased    {_number(state.debiased)}",
            f"  count       {state.count}",
            f"  last        {_number(state.last)}",
            f"  decay used  {_number(state.decay_used)}",
            f"  updated     {_when(state.updated_at)}",
            f"  config      decay {_number(config.decay)}, initial {_number(config.initial)}, "
            f"auto_num_updates {'on' if config.auto_num_updates else 'off'}",
        ]
    )


def _state_json(state: State) -> str:
    return state.model_dump_json()


@dataclass(frozen=True)
class Reading:
    """One point `watch` shows: from a GET, a poll or an update event."""

    name: str
    value: float | None
    last: float | None
    count: int
    updated_at: float | None

    @classmethod
    def of(cls, state: State | Update) -> Reading:
        return cls(state.name, state.value, state.last, state.count, state.updated_at)


class Sparkline:
    """The last `width` values as bar characters, scaled between their minimum and maximum."""

    BARS = "▁▂▃▄▅▆▇█"
    ASCII = "_.-=+*#@"

    def __init__(self, width: int = 32, *, ascii_only: bool = False) -> None:
        self.values: deque[float] = deque(maxlen=width)
        self.bars = self.ASCII if ascii_only else self.BARS

    def add(self, value: float | None) -> None:
        if value is not None and math.isfinite(value):
            self.values.append(value)

    def render(self) -> str:
        if not self.values:
            return ""
        low, high = min(self.values), max(self.values)
        top = len(self.bars) - 1
        if high == low:
            return self.bars[top // 2] * len(self.values)
        return "".join(self.bars[round((v - low) / (high - low) * top)] for v in self.values)


class WatchDisplay:
    """Shows readings: one rewritten line on a terminal, a line per reading otherwise, or JSON
    lines."""

    def __init__(self, out: TextIO, *, as_json: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.live = out.isatty() and not as_json
        self.sparkline = Sparkline(ascii_only=not _can_encode(out, Sparkline.BARS))
        self.shown = False

    def show(self, reading: Reading) -> None:
        self.sparkline.add(reading.value)
        if self.as_json:
            self._line(json.dumps(asdict(reading)))
            return
        text = (
            f"{reading.name}  {_short(reading.value)}  {self.sparkline.render()}  "
            f"last {_short(reading.last)}  n={reading.count}"
        )
        self._line(text)

    def note(self, text: str) -> None:
        """A status such as 'waiting for the stream'; only on a terminal."""
        if self.live:
            self._line(text)

    def _line(self, text: str) -> None:
        if self.live:
            self.out.write(f"\r\x1b[2K{text}")
        else:
            self.out.write(f"{text}\n")
        self.out.flush()
        self.shown = True

    def finish(self) -> None:
        if self.live and self.shown:
            self.out.write("\n")
            self.out.flush()


def _can_encode(out: TextIO, text: str) -> bool:
    try:
        text.encode(out.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


# --- commands ---------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, api_key=args.api_key, timeout=args.timeout)


def _push(args: argparse.Namespace) -> None:
    if args.num_updates is not None and len(args.values) > 1:
        raise _UsageError("--num-updates goes with a single value")
    with _client(args) as ema:
        if len(args.values) == 1:
            state = ema.push(
                args.name,
                args.values[0],
                num_updates=args.num_updates,
                idempotent=args.idempotent,
                idempotency_key=args.idempotency_key,
            )
        else:
            state = ema.push_many(
                args.name,
                args.values,
                idempotent=args.idempotent,
                idempotency_key=args.idempotency_key,
            )
    if args.json:
        print(_state_json(state))
    else:
        print(f"{state.name}  value {_number(state.value)}  count {state.count}")


def _get(args: argparse.Namespace) -> None:
    with _client(args) as ema:
        state = ema.get(args.name)
    print(_state_json(state) if args.json else _state_text(state))


def _create(args: argparse.Namespace) -> None:
    with _client(args) as ema:
        state = ema.create(
            args.name,
            decay=args.decay,
            initial=args.initial,
            auto_num_updates=args.auto_num_updates,
        )
    print(_state_json(state) if args.json else _state_text(state))


def _ls(args: argparse.Namespace) -> None:
    with _client(args) as ema:
        names = sorted(ema.list_streams(args.prefix))
    if args.json:
        print(json.dumps(names))
    else:
        for name in names:
            print(name)


def _rm(args: argparse.Namespace) -> None:
    with _client(args) as ema:
        for name in args.names:
            ema.delete(name)
            print(json.dumps({"deleted": name}) if args.json else f"deleted {name}")


def _serve(args: argparse.Namespace) -> None:
    # The service is another distribution (ema-service): this package installs without it.
    if not _service_installed():
        raise EmaError(
            "ema serve runs the service, which is not installed here "
            "(pip install . from the repository root, or use ./scripts/run)"
        )
    env = dict(os.environ)
    for variable, value in (
        ("EMA_HOST", args.host),
        ("EMA_PORT", args.port),
        ("EMA_WORKERS", args.workers),
    ):
        if value is not None:
            env[variable] = str(value)
    sys.stdout.flush()
    # Replace this process: signals (Ctrl-C, SIGTERM) then reach the server directly.
    os.execve(sys.executable, [sys.executable, "-m", "app"], env)


def _service_installed() -> bool:
    try:
        importlib.metadata.distribution("ema-service")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _watch(args: argparse.Namespace) -> None:
    display = WatchDisplay(sys.stdout, as_json=args.json)
    try:
        anyio.run(_watch_bounded, args, display)
    finally:
        display.finish()


async def _watch_bounded(args: argparse.Namespace, display: WatchDisplay) -> None:
    # --count counts updates to the stream, not lines shown: polling and a lagged subscriber
    # may skip some, and the bound must hold all the same.
    with anyio.move_on_after(args.duration):
        async with AsyncClient(args.url, api_key=args.api_key, timeout=args.timeout) as ema:
            current = await _current(ema, args.name, display)
            start = 0 if current is None else current.count
            if current is not None:
                display.show(current)
            async with aclosing(_changes(ema, args, display, current)) as changes:
                async for reading in changes:
                    display.show(reading)
                    if args.count is not None and reading.count - start >= args.count:
                        return


async def _changes(
    ema: AsyncClient, args: argparse.Namespace, display: WatchDisplay, current: Reading | None
) -> AsyncGenerator[Reading]:
    """The stream's changes after `current`: from its events when the service has them, else
    by polling."""
    if not args.poll and await _has_events(ema):
        since = None if current is None else str(current.count)
        shown = -1
        async with ema.subscribe(args.name, last_event_id=since) as events:
            async for event in events:
                reading = (
                    Reading.of(event)
                    if isinstance(event, Update)
                    # Updates were skipped: show where the stream is now.
                    else await _current(ema, args.name, display)
                )
                # After a catch-up read, the events it already covers are old news.
                if reading is not None and reading.count > shown:
                    shown = reading.count
                    yield reading
        return
    seen = None if current is None else current.count
    while True:
        await anyio.sleep(args.interval)
        reading = await _current(ema, args.name, display)
        if reading is not None and reading.count != seen:
            seen = reading.count
            yield reading


async def _current(ema: AsyncClient, name: str, display: WatchDisplay) -> Reading | None:
    try:
        return Reading.of(await ema.get(name))
    except NotFound:
        display.note(f"{name}: no such stream yet; waiting")
        return None


async def _has_events(ema: AsyncClient) -> bool:
    try:
        return (await ema.features()).events
    except ApiError:
        return False  # no /openapi.json: assume the oldest service


# --- arguments --------------------------------------------------------------------------------


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _common() -> _Parser:
    # On every subcommand too (ema get cpu --json), where they default to the main parser's.
    common = _Parser(add_help=False)
    common.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help=f"the service (default: ${URL_VARIABLE}, else {DEFAULT_URL})",
    )
    common.add_argument(
        "--api-key", default=argparse.SUPPRESS, help=f"API key (default: ${API_KEY_VARIABLE})"
    )
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    common.add_argument(
        "--timeout",
        type=_positive(float),
        default=argparse.SUPPRESS,
        help="seconds to wait for the service (default: 10)",
    )
    return common


def parser() -> argparse.ArgumentParser:
    """The `ema` command's arguments."""
    # Separate copies: set_defaults below changes the defaults of the very action objects.
    common = _common()
    main = _Parser(
        prog="ema",
        description="Streaming exponential moving averages: talk to an EMA service.",
        parents=[_common()],
    )
    main.set_defaults(url=None, api_key=None, json=False, timeout=10.0)
    main.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = main.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(name: str, run: Callable[[argparse.Namespace], None], summary: str) -> Any:
        sub = commands.add_parser(name, help=summary, description=summary, parents=[common])
        sub.set_defaults(run=run, command=sub)
        return sub

    push = command("push", _push, "apply values to a stream, in order, atomically")
    push.add_argument("name")
    push.add_argument("values", metavar="VALUE", type=float, nargs="+")
    push.add_argument("--num-updates", type=int, help="TensorFlow's num_updates (the step)")
    push.add_argument(
        "--idempotent", action="store_true", help="send an Idempotency-Key so it may be retried"
    )
    push.add_argument("--idempotency-key", metavar="KEY", help="send this Idempotency-Key")

    get = command("get", _get, "show a stream's state")
    get.add_argument("name")

    create = command("create", _create, "create a stream, or replace its configuration")
    create.add_argument("name")
    create.add_argument("--decay", type=float, required=True, help="in [0, 1]")
    create.add_argument("--initial", type=float, help="starting value (default: the first)")
    create.add_argument("--auto-num-updates", action="store_true", help="use the count as step")

    ls = command("ls", _ls, "list stream names")
    ls.add_argument("--prefix", default="", help="only names starting with this")

    rm = command("rm", _rm, "delete streams")
    rm.add_argument("names", metavar="NAME", nargs="+")

    watch = command("watch", _watch, "show a stream's average live, with a sparkline")
    watch.add_argument("name")
    watch.add_argument("--duration", type=_positive(float), help="stop after this many seconds")
    watch.add_argument("--count", type=_positive(int), help="stop after this many updates")
    watch.add_argument("--poll", action="store_true", help="poll even if events are available")
    watch.add_argument(
        "--interval", type=_positive(float), default=1.0, help="seconds between polls (1)"
    )

    serve = command("serve", _serve, "run the service (python -m app)")
    serve.add_argument("--host", help="address to listen on (EMA_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (EMA_PORT)")
    serve.add_argument("--workers", type=_positive(int), help="worker processes (EMA_WORKERS)")
    return main


def main(argv: Sequence[str] | None = None) -> int:
    """The `ema` console script; returns the exit status."""
    arguments = parser()
    args = arguments.parse_args(argv)
    try:
        args.run(args)
    except _UsageError as error:
        args.command.error(str(error))
    except EmaError as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `ema ls | head`: the reader left. Point stdout at nothing so that the flush at exit
        # does not complain, and say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except OSError as error:
        return _fail(str(error))
    return 0


def _fail(message: str) -> int:
    first = message.splitlines()[0] if message else "failed"
    print(f"ema: error: {first}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
