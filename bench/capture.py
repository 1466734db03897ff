"""The Redis commands the service really sends, learnt by watching one push and one read with
MONITOR, so that the floor and the ceiling make exactly the same calls (the same push.lua, the
same KEYS and leading ARGV, whatever the service's version puts there), with only the stream
name and the values changed."""

import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from servers import HOST, BenchError

_LINE = re.compile(r"^\+[\d.]+ \[\d+ ([^\]]+)\] (.*)$")
_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "a": "\a", "b": "\b", '"': '"', "\\": "\\"}


@dataclass(frozen=True)
class Template:
    """A command as the service sent it for stream `name`; `bind` re-targets it to another."""

    argv: tuple[str, ...]
    name: str

    def bind(self, name: str) -> list[str]:
        return [part.replace(self.name, name) for part in self.argv]

    def show(self) -> str:
        """For the report: the command, the stream name as NAME, long args (the SHA) cut."""
        parts = [part.replace(self.name, "NAME") for part in self.argv]
        return " ".join(
            repr(p) if not p or " " in p else p if len(p) <= 24 else p[:10] + "…" for p in parts
        )


def unescape(text: str) -> str:
    """Undo redis' sdscatrepr quoting: backslash escapes and \\xHH."""
    out, i = [], 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            code = text[i + 1]
            if code == "x" and i + 3 < len(text):
                out.append(chr(int(text[i + 2 : i + 4], 16)))
                i += 4
                continue
            out.append(_ESCAPES.get(code, code))
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


def watch(port: int, action: Callable[[], object], timeout: float = 5.0) -> list[list[str]]:
    """The commands clients sent to Redis (not those run by scripts) while `action` ran."""
    try:
        return _watch(port, action, timeout)
    except OSError as error:
        raise BenchError(f"capturing the service's Redis commands failed: {error}") from error


def _watch(port: int, action: Callable[[], object], timeout: float) -> list[list[str]]:
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(b"MONITOR\r\n")
        reader = sock.makefile("rb")
        if reader.readline().strip() != b"+OK":
            raise BenchError("redis-server refused MONITOR")
        marker = f"bench-capture-{time.monotonic_ns()}"
        action()
        # A command of our own marks the end: everything the action caused comes before it.
        with socket.create_connection((HOST, port), timeout=timeout) as other:
            other.sendall(f"ECHO {marker}\r\n".encode())
            other.recv(1024)
        commands: list[list[str]] = []
        for raw in reader:
            match = _LINE.match(raw.decode("utf-8", "replace").rstrip("\r\n"))
            if match is None or match[1] == "lua":
                continue
            argv = [unescape(arg) for arg in _ARG.findall(match[2])]
            if argv == ["ECHO", marker]:
                return commands
            commands.append(argv)
    raise BenchError("MONITOR ended before the capture was complete")


@dataclass(frozen=True)
class PushCall:
    """The service's EVALSHA for a push: everything up to the first value (`head`), and the
    arguments that follow each value of a sample that carries nothing else (`per_value`: none
    where push.lua takes the values alone, an empty num_updates and timestamp where it takes
    triples)."""

    head: Template
    per_value: tuple[str, ...]

    def bind(self, name: str, values: Sequence[str]) -> list[str]:
        samples = (part for value in values for part in (value, *self.per_value))
        return [*self.head.bind(name), *samples]

    def show(self) -> str:
        sample = " ".join(["<value>", *(p or repr(p) for p in self.per_value)])
        return f"{self.head.show()} {sample} ..."


def push_call(commands: Sequence[Sequence[str]], name: str, values: tuple[str, str]) -> PushCall:
    """Find the push of two `values` among `commands`: an EVALSHA where the arguments between
    the values repeat after the second one, and end it."""
    first, second = values
    for argv in reversed(commands):
        if not argv or argv[0].upper() != "EVALSHA" or first not in argv or second not in argv:
            continue
        i = argv.index(first)
        j = argv.index(second, i + 1) if second in argv[i + 1 :] else -1
        if j > i and list(argv[j + 1 :]) == list(argv[i + 1 : j]):
            return PushCall(Template(tuple(argv[:i]), name), tuple(argv[i + 1 : j]))
    raise BenchError(
        "the service's push did not show as one EVALSHA ending with its values; "
        f"bench/capture.py needs updating. Seen: {commands}"
    )


def read_template(commands: Sequence[Sequence[str]], name: str) -> Template:
    """The service's read of one stream: its only command naming the stream."""
    reads = [argv for argv in commands if any(name in part for part in argv[1:])]
    if len(reads) != 1:
        raise BenchError(f"expected the service's GET to send one command, saw {commands}")
    return Template(tuple(reads[0]), name)
