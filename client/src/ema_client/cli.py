"""`ema`: the EMA service from a terminal.

    ema push cpu 5 --num-updates 0     apply a value (or several: ema push cpu 1 2 3)
    ema get cpu                        a stream's state, configuration and windows
    ema ls --prefix cpu.               a table of streams: name, kind, value, count, updated
    ema watch cpu                      a live line with a sparkline of the average
    ema rm cpu                         delete streams
    ema create cpu --decay 0.99        create or replace a stream's configuration
    ema serve --port 8000              run the service (python -m app), when it is installed

The service is at --url (http://host:port, or host:port), else $EMA_URL, else
http://127.0.0.1:8000; the API key is --api-key, else $EMA_API_KEY. Output is for people;
--json prints JSON (one object per line for watch). Errors print one line to stderr and exit 1
(2 for bad arguments, 130 on Ctrl-C).
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
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from contextlib import aclosing, contextmanager, suppress
from dataclasses import asdict, dataclass, replace
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
    InvalidInput,
    NotFound,
    Page,
    Retry,
    State,
    TransportError,
    Update,
)

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# The service's rule for stream names (app.keys.NAME_RULE; a test keeps the two equal), to say
# what is wrong with a name in words rather than as the service's regular expression.
NAME_RULE = "1 to 200 characters from A-Z a-z 0-9 _ . : -, but not `.` or `..`"

# Statuses after which `watch` reconnects: the service or a proxy in front of it is restarting.
_PASSING = frozenset({429, 502, 503, 504})


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _UsageError(Exception):
    """Arguments argparse accepts but that do not go together."""


class _BadName(EmaError):
    """The service refused a stream name: said in words."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name!r} is not a valid stream name: a name is {NAME_RULE}")


@contextmanager
def _naming(name: str) -> Iterator[None]:
    """Turns the service's 422 for a malformed name into a sentence about that name."""
    try:
        yield
    except InvalidInput as error:
        if any(list(e.get("loc", ())) == ["path", "name"] for e in error.errors or ()):
            raise _BadName(name) from None
        raise
    except NotFound as error:
        # No route at all (a name with a slash): not "no such stream".
        if repr(name) not in error.detail and name not in error.detail:
            raise _BadName(name) from None
        raise


# --- output -----------------------------------------------------------------------------------


def _number(x: float | None) -> str:
    return "-" if x is None else repr(x)


def _short(x: float | None) -> str:
    return "-" if x is None else f"{x:.6g}"


def _seconds(x: float) -> str:
    return f"{x:g} s"


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
    return f"{stamp}.{int(seconds % 1 * 1000):03d}"


def _ago(seconds: float) -> str:
    """An age in the largest unit that keeps it readable: 4s, 12m, 3h, 2d."""
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def _is_rate(state: State) -> bool:
    return state.config.kind == "rate"


def _value(value: float | None, rate: bool) -> str:
    """A stream's value; a rate stream's in events per second."""
    return f"{_short(value)}/s" if rate and value is not None else _short(value)


def _averaging(config: dict[str, Any]) -> str:
    if config.get("halflife") is not None:
        return f"halflife {_seconds(config['halflife'])}"
    return f"decay {_number(config.get('decay'))}"


def _state_text(state: State) -> str:
    config = state.config
    rate = _is_rate(state)
    if config.halflife is not None:
        averaging = f"halflife {_seconds(config.halflife)}"
    else:
        averaging = (
            f"decay {_number(config.decay)}, initial {_number(config.initial)}, "
            f"auto_num_updates {'on' if config.auto_num_updates else 'off'}"
        )
    lines = [
        state.name,
        f"  kind        {config.kind}{' (events/s)' if rate else ''}",
        f"  value       {_number(state.value)}{'/s' if rate and state.value is not None else ''}",
        f"  debiased    {_number(state.debiased)}",
        f"  std         {_number(state.std)}",
        f"  z           {_number(state.z)}",
        f"  count       {state.count}",
        f"  last        {_number(state.last)}",
        f"  decay used  {_number(state.decay_used)}",
        f"  updated     {_when(state.updated_at)}",
    ]
    if state.timestamp is not None and config.halflife is not None:
        lines.append(f"  timestamp   {_when(state.timestamp)} (newest sample)")
    lines.append(f"  config      {averaging}")
    if config.halflife is None:
        lines.append(f"  arithmetic  {config.arithmetic}")
    windows = state.windows or {}
    rows = [
        [name, _value(window.get("value"), rate), _averaging(window)]
        for name, window in windows.items()
        if isinstance(window, dict)
    ]
    for i, row in enumerate(_table(rows).splitlines() if rows else ()):
        lines.append(("  windows     " if i == 0 else " " * 14) + row)
    ttl = "none" if config.ttl is None else _seconds(config.ttl)
    lines.append(f"  retention   late {config.late}, ttl {ttl}, history {config.history}")
    # Fields of a service newer than this command, shown as they come.
    for key, extra in state.extra.items():
        lines.append(f"  {key:<10}  {json.dumps(extra)}")
    return "\n".join(lines)


def _state_json(state: State) -> str:
    return json.dumps(state.to_dict())


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


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
    lines. A rate stream's line on a terminal keeps decaying between readings, as its rate does
    while no events come. Disconnections are marked on the line, or told on stderr."""

    def __init__(self, out: TextIO, *, as_json: bool, err: TextIO = sys.stderr) -> None:
        self.out = out
        self.err = err
        self.as_json = as_json
        self.live = out.isatty() and not as_json
        self.sparkline = Sparkline(ascii_only=not _can_encode(out, Sparkline.BARS))
        self.shown = 0
        self.halflife: float | None = None  # a rate stream's: its value decays by it
        self.latest: Reading | None = None
        self.received = 0.0
        self.status = ""

    def show(self, reading: Reading) -> None:
        """Shows a reading as received (counts toward --count)."""
        self.latest, self.received, self.status = reading, time.monotonic(), ""
        self.shown += 1
        self.sparkline.add(reading.value)
        if self.as_json:
            self._line(json.dumps(asdict(reading)))
        else:
            self._line(self._text(reading))

    def tick(self) -> None:
        """On a terminal, redraws a rate stream's line with its rate decayed to now."""
        if self.live and self.latest is not None and self.halflife is not None:
            elapsed = time.monotonic() - self.received
            value = self.latest.value
            if value is not None:
                value *= 2 ** (-elapsed / self.halflife)
            self._line(self._text(replace(self.latest, value=value)))

    def disconnected(self, why: str) -> None:
        first = not self.status
        self.status = f"disconnected ({why}); reconnecting"
        if self.live:
            self._line(self._text(self.latest) if self.latest else f"[{self.status}]")
        elif first:  # once per outage, not once per attempt
            self.err.write(f"ema: {self.status}\n")
            self.err.flush()

    def reconnected(self) -> None:
        if self.status and not self.live:
            self.err.write("ema: reconnected\n")
            self.err.flush()
        self.status = ""

    def note(self, text: str) -> None:
        """A status such as 'waiting for the stream'; only on a terminal."""
        if self.live:
            self._line(text)

    def _text(self, reading: Reading) -> str:
        rate = self.halflife is not None
        text = (
            f"{reading.name}  {_value(reading.value, rate)}  {self.sparkline.render()}  "
            f"last {_short(reading.last)}  n={reading.count}"
        )
        return f"{text}  [{self.status}]" if self.status else text

    def _line(self, text: str) -> None:
        if self.live:
            self.out.write(f"\r\x1b[2K{text}")
        else:
            self.out.write(f"{text}\n")
        self.out.flush()

    def finish(self) -> None:
        if self.live and (self.shown or self.status):
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
    with _client(args) as ema, _naming(args.name):
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
    with _client(args) as ema, _naming(args.name):
        state = ema.get(args.name)
    print(_state_json(state) if args.json else _state_text(state))


def _create(args: argparse.Namespace) -> None:
    config: dict[str, Any] = {
        "kind": args.kind,
        "windows": args.windows,
        "late": args.late,
        "ttl": args.ttl,
        "history": args.history,
        "arithmetic": args.arithmetic,
    }
    config.update(args.settings or {})
    with _client(args) as ema, _naming(args.name):
        state = ema.create(
            args.name,
            decay=args.decay,
            halflife=args.halflife,
            initial=args.initial,
            auto_num_updates=args.auto_num_updates,
            **{key: value for key, value in config.items() if value is not None},
        )
    print(_state_json(state) if args.json else _state_text(state))


def _ls(args: argparse.Namespace) -> None:
    states, now = _listing(args)
    if args.json:
        print(json.dumps([state.to_dict() for state in states]))
        return
    rows = [["NAME", "KIND", "VALUE", "COUNT", "UPDATED"]]
    for state in states:
        updated = "never" if state.updated_at is None else _ago(now - state.updated_at)
        value = _value(state.value, _is_rate(state))
        rows.append([state.name, state.config.kind, value, str(state.count), updated])
    if len(rows) > 1:
        print(_table(rows))


def _listing(args: argparse.Namespace) -> tuple[list[State], float]:
    """Every stream under the prefix with its state, sorted by name, and the service's time
    they are as of (this machine's, from a service that does not say)."""
    found: dict[str, State] = {}
    now: float | None = None
    with _client(args) as ema:
        cursor: str | None = None
        while True:
            page: Page = ema.list_page(args.prefix, cursor=cursor, limit=500, states=True)
            if page.states is not None:
                found.update((state.name, state) for state in page.states)
                now = page.time if page.time is not None else now
            else:  # a service without states=true: one GET per name
                for name in page.streams:
                    # A name deleted, or expired, since it was listed is left out.
                    with suppress(NotFound):
                        found.setdefault(name, ema.get(name))
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
    return [found[name] for name in sorted(found)], now if now is not None else time.time()


def _rm(args: argparse.Namespace) -> None:
    with _client(args) as ema:
        for name in args.names:
            with _naming(name):
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
        with _naming(args.name):
            anyio.run(_watch_bounded, args, display)
    finally:
        display.finish()


class _Done(Exception):
    """--count readings were shown."""


async def _watch_bounded(args: argparse.Namespace, display: WatchDisplay) -> None:
    with anyio.move_on_after(args.duration):
        async with AsyncClient(args.url, api_key=args.api_key, timeout=args.timeout) as ema:
            # The first read fails loudly (a wrong URL or key); later outages are waited out.
            current = await _current(ema, args.name, display)
            failure: Exception | None = None
            async with anyio.create_task_group() as tasks:
                if display.live:
                    tasks.start_soon(_ticks, display)
                try:
                    if current is not None:
                        _show(display, current, args.count)
                    await _follow(ema, args, display, current)
                except _Done:
                    pass
                except Exception as error:  # raised once the ticks stop: not in a group
                    failure = error
                tasks.cancel_scope.cancel()
            if failure is not None:
                raise failure


def _show(display: WatchDisplay, reading: Reading, count: int | None) -> None:
    display.show(reading)
    if count is not None and display.shown >= count:
        raise _Done


async def _ticks(display: WatchDisplay) -> None:
    while True:
        await anyio.sleep(0.25)
        display.tick()


async def _follow(
    ema: AsyncClient, args: argparse.Namespace, display: WatchDisplay, current: Reading | None
) -> None:
    """Shows the stream's changes after `current`; after a lost connection, marks it, waits
    with backoff, and resumes from a fresh read."""
    retry = Retry()
    failures = 0
    while True:
        try:
            async with aclosing(_changes(ema, args, display, current)) as changes:
                async for reading in changes:
                    failures = 0
                    display.reconnected()
                    current = reading
                    _show(display, reading, args.count)
        except (TransportError, ApiError) as error:
            if isinstance(error, ApiError) and error.status not in _PASSING:
                raise
            failures += 1
            display.disconnected(_reason(error))
            await anyio.sleep(retry.delay(min(failures, 6)))
            try:
                fresh = await _current(ema, args.name, display)
            except (TransportError, ApiError) as again:
                if isinstance(again, ApiError) and again.status not in _PASSING:
                    raise
                continue
            display.reconnected()
            if fresh is not None and (current is None or fresh.count != current.count):
                current = fresh
                _show(display, fresh, args.count)


def _reason(error: EmaError) -> str:
    if isinstance(error, ApiError):
        return f"{error.status} {error.problem.title}"
    text = str(error)
    return text.split(": ", 1)[-1] if ": " in text else text


async def _changes(
    ema: AsyncClient, args: argparse.Namespace, display: WatchDisplay, current: Reading | None
) -> AsyncGenerator[Reading]:
    """The stream's changes after `current`: from its events when the service has them, else
    by polling. Raises when the connection is lost."""
    if not args.poll and await _has_events(ema):
        since = None if current is None else str(current.count)
        shown = -1 if current is None else current.count
        # No reconnection here: _follow marks each one.
        subscription = ema.subscribe(
            args.name, last_event_id=since, max_reconnects=0, idle_timeout=45
        )
        async with subscription as events:
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
        state = await ema.get(name)
    except NotFound:
        display.note(f"{name}: no such stream yet; waiting")
        return None
    display.halflife = state.config.halflife if _is_rate(state) else None
    return Reading.of(state)


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


def _window(text: str) -> dict[str, Any]:
    """--window NAME:decay=D or NAME:halflife=SECONDS."""
    name, _, setting = text.partition(":")
    field, _, number = setting.partition("=")
    if not name or field not in ("decay", "halflife"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME:decay=D or NAME:halflife=SECONDS"
        )
    try:
        return {"name": name, field: float(number)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {number!r} is not a number") from None


def _setting(text: str) -> tuple[str, Any]:
    """--set FIELD=VALUE, the value read as JSON when it is JSON, else as a string."""
    field, equals, raw = text.partition("=")
    if not field or not equals:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIELD=VALUE")
    try:
        return field, json.loads(raw)
    except ValueError:
        return field, raw


class _Settings(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        settings = dict(getattr(namespace, self.dest) or {})
        field, value = values
        settings[field] = value
        setattr(namespace, self.dest, settings)


def _common() -> _Parser:
    # On every subcommand too (ema get cpu --json), where they default to the main parser's.
    common = _Parser(add_help=False)
    common.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help=f"the service: http://host:port or host:port (default: ${URL_VARIABLE}, "
        f"else {DEFAULT_URL})",
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

    get = command("get", _get, "show a stream's state, configuration and windows")
    get.add_argument("name")

    create = command("create", _create, "create a stream, or replace its configuration")
    create.add_argument("name")
    averaging = create.add_mutually_exclusive_group(required=True)
    averaging.add_argument("--decay", type=float, help="TensorFlow's decay per update, in [0, 1]")
    averaging.add_argument("--halflife", type=float, help="seconds: an average by time")
    create.add_argument(
        "--kind",
        choices=["mean", "rate"],
        help="mean (default), or rate: values are event counts, read as events/s (a halflife)",
    )
    create.add_argument("--initial", type=float, help="with --decay: the starting value")
    create.add_argument(
        "--auto-num-updates", action="store_true", help="with --decay: the count is the step"
    )
    create.add_argument(
        "--window",
        dest="windows",
        action="append",
        type=_window,
        metavar="NAME:decay=D|NAME:halflife=S",
        help="one more named average of the same values (repeat for more)",
    )
    create.add_argument(
        "--late", choices=["merge", "reject"], help="a sample older than the newest (merge)"
    )
    create.add_argument(
        "--arithmetic",
        choices=["float64", "tensorflow-float64", "tensorflow-float32"],
        help="with --decay: how the average is computed (float64)",
    )
    create.add_argument("--ttl", type=_positive(int), help="seconds without a push before deletion")
    create.add_argument("--history", type=int, help="keep the newest N entries (0)")
    create.add_argument(
        "--set",
        dest="settings",
        action=_Settings,
        type=_setting,
        metavar="FIELD=VALUE",
        help="any other configuration field, the value as JSON (repeat for more)",
    )

    ls = command("ls", _ls, "list streams: name, kind, value, count, last update")
    ls.add_argument("--prefix", default="", help="only names starting with this")

    rm = command("rm", _rm, "delete streams")
    rm.add_argument("names", metavar="NAME", nargs="+")

    watch = command("watch", _watch, "show a stream's average live, with a sparkline")
    watch.add_argument("name")
    watch.add_argument("--duration", type=_positive(float), help="stop after this many seconds")
    watch.add_argument("--count", type=_positive(int), help="stop after showing this many readings")
    watch.add_argument("--poll", action="store_true", help="poll even if events are available")
    watch.add_argument(
        "--interval", type=_positive(float), default=1.0, help="seconds between polls (1)"
    )

    serve = command("serve", _serve, "run the service (python -m app), when it is installed")
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
