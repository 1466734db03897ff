"""Structured logs: one JSON object per line (or a readable line on a terminal), and one line
per request with its request id.

The request id is the client's `X-Request-ID` when it sends a sane one, else a new one; it is
echoed in the response. Request lines carry the path without its query string (which may hold
an `api_key`) and the name of the API key used, never the key.
"""

import asyncio
import contextlib
import json
import logging
import logging.config
import os
import random
import re
import sys
import time
from typing import Any, Final

from starlette.types import Scope

access_log = logging.getLogger("app.access")

_REQUEST_ID: Final = re.compile(rb"[\x21-\x7e]{1,128}")
# LogRecord attributes that are not extra fields given by the caller.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "fields",  # an access record's (_AccessRecord)
}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: time, level, logger, message and any `extra` fields."""

    # Made once: json.dumps(..., default=str) makes an encoder per call, and with the access
    # log on, this formats a line per request.
    _encoder = json.JSONEncoder(default=str)
    _second = -1  # the second whose formatted time is cached in _stamp
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        entry: dict[str, Any] = {
            "time": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if isinstance(record, _AccessRecord):
            entry.update(record.fields)
        else:
            entry.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return self._encoder.encode(entry)


JsonFormatter.converter = time.gmtime


# uvicorn adds a copy of its message with ANSI colours: one copy is enough.
_NOT_IN_TEXT = _STANDARD | {"color_message"}


class TextFormatter(logging.Formatter):
    """Formats a record as one line for people: local time, level, logger, message, then any
    `extra` fields as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%H:%M:%S") + f".{int(record.msecs):03d}"
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        extra = [f"{k}={v}" for k, v in vars(record).items() if k not in _NOT_IN_TEXT]
        if extra:
            line += "  " + " ".join(extra)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class TurnBatchedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr, written once per event-loop turn: the lines a turn logs (a busy worker's access
    lines) go out in one write rather than one each. Outside an event loop, at once; what is
    pending when the process exits is written by logging's shutdown (a flush)."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # another thread, or no loop yet
            self.flush()
            return
        if len(self._pending) == 1:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock if self.lock is not None else contextlib.nullcontext():
            if self._pending:
                lines, self._pending = self._pending, []
                self.stream.write("".join(lines))
            super().flush()


def resolve_format(fmt: str) -> str:
    """`auto`: readable lines when stderr is a terminal (someone is reading), JSON otherwise
    (a file, a pipe, a log collector)."""
    if fmt != "auto":
        return fmt
    return "text" if sys.stderr.isatty() else "json"


def logging_config(level: str, fmt: str) -> dict[str, Any]:
    """A dictConfig for the service and uvicorn alike."""
    kind = JsonFormatter if resolve_format(fmt) == "json" else TextFormatter
    formatter = {"()": kind}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "stderr": {"class": "app.logs.TurnBatchedHandler", "formatter": "default"},
        },
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            "uvicorn.access": {"handlers": [], "propagate": False},
        },
    }


class _AccessRecord(logging.LogRecord):
    """An access line's record, made without what LogRecord looks up for every record (the
    caller's file and module, the thread's and process' names: they never change here, and
    this is every request), and with its fields in `fields` as well as in its attributes (so
    that JsonFormatter need not look for them)."""

    def __init__(self, args: tuple[str, str, int], fields: dict[str, Any]) -> None:
        # LogRecord.__init__ skipped on purpose: its attributes come from _ACCESS_TEMPLATE.
        self.__dict__.update(_ACCESS_TEMPLATE)
        self.created = created = time.time()
        self.msecs = int(created * 1000) % 1000
        self.relativeCreated = (created - _STARTED) * 1000
        self.args = args
        self.process = os.getpid()  # a worker forked after import is another process
        self.__dict__.update(fields)
        self.fields = fields


_STARTED: Final = time.time()
_ACCESS_TEMPLATE: Final = vars(
    logging.LogRecord(access_log.name, logging.INFO, __file__, 0, "%s %s %d", (), None)
)


def log_request(scope: Scope, status: int, request_id: bytes, seconds: float) -> None:
    """The access log's line for a finished request (app.asgi.Bookkeeping calls it)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    key = scope.get("state", {}).get("api_key")
    method, path = scope["method"], scope["path"]
    fields = {
        "request_id": request_id.decode(),
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
        "client": (scope.get("client") or ("", 0))[0],
        "api_key": key.name if key is not None else None,
    }
    access_log.handle(_AccessRecord((method, path, status), fields))


def request_id(scope: Scope) -> bytes:
    """The client's X-Request-ID when it is sane, else a new one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id" and _REQUEST_ID.fullmatch(value):
            return bytes(value)
    # Random, not secret: the Mersenne Twister (reseeded in forked workers) is cheaper than
    # uuid4's os.urandom, and this is every request.
    return b"%032x" % random.getrandbits(128)
