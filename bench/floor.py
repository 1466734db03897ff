"""The floor: the least a Python HTTP push can cost, to measure the service against.

A bare ASGI app, no framework: read the body, `json.loads` it, run one EVALSHA of the service's
own push.lua through redis.asyncio, and write the reply back as JSON. GET does the service's
read (HGETALL, or HMGET in older versions).

It makes exactly the Redis calls the service makes: bench/run.py watches the service with
MONITOR and passes them here as templates (JSON argv lists, for the stream named BENCH_NAME):
  BENCH_PUSH       `EVALSHA sha numkeys KEYS... ARGV...` up to the first value
  BENCH_PER_VALUE  what follows each value that carries nothing else ([] where the service
                   sends values alone, ["", ""] where it sends triples); the floor appends
                   (value, *BENCH_PER_VALUE) per value
  BENCH_READ       the read: `HGETALL key` (the reply is the hash), or `HMGET key field...` (the
                   reply is keyed by those fields)
The bodies are {"value": x} or {"values": [x, ...]} of numbers; validation is only what building
the arguments needs: the Lua script checks the numbers, as it does for the service.

Served like the service: `python -m uvicorn --app-dir bench floor:app --workers N`, with
REDIS_URL.
"""

import json
import os
import re
from typing import Any, Final

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from app.keys import NAME_PATTERN
from app.main import HiredisPackedConnection

Scope = dict[str, Any]
Message = dict[str, Any]

# The service's own name rule, so that the floor routes exactly the names the service does.
_NAME: Final = NAME_PATTERN.removeprefix("^").removesuffix("$")
_PUSH: Final = re.compile(rf"/v1/streams/({_NAME})/values")
_STREAM: Final = re.compile(rf"/v1/streams/({_NAME})")
_HEADERS: Final = [(b"content-type", b"application/json")]


class Floor:
    """The ASGI app. One Redis client per worker, opened and closed by the lifespan."""

    def __init__(self) -> None:
        self.client: Redis | None = None
        self.name = ""
        self.push: list[str] = []
        self.per_value: list[str] = []
        self.read: list[str] = []
        self.fields: list[str] = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        try:
            if method == "POST" and (match := _PUSH.fullmatch(path)):
                status, body = await self._push(match[1], await _read_body(receive))
            elif method == "GET" and (match := _STREAM.fullmatch(path)):
                status, body = await self._get(match[1])
            elif method == "GET" and path == "/healthz":
                status, body = 200, {"status": "ok"}
            else:
                status, body = 404, {"detail": "not found"}
        except RedisError as error:
            status, body = 503, {"detail": str(error)}
        await send({"type": "http.response.start", "status": status, "headers": _HEADERS})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

    async def _push(self, name: str, raw: bytes) -> tuple[int, dict[str, Any]]:
        try:
            args = _samples(json.loads(raw), self.per_value)
        except (ValueError, TypeError, KeyError) as error:
            return 422, {"detail": f"invalid push: {error}"}
        command = [part.replace(self.name, name) for part in self.push]
        try:
            reply = await self._call(*command, *args)
        except ResponseError as error:
            return 422, {"detail": str(error)}
        if not self.fields:  # push.lua's reply: `f=v;...;s=<packed state>`
            head, _, state = reply.removeprefix("replayed\n").partition(";s=")
            fields = dict(part.split("=", 1) for part in head.split(";"))
            packed = state.encode("utf-8", "surrogateescape").hex()
            return 200, {"name": name, **fields, "s": packed}
        return 200, {"name": name, **dict(zip(self.fields, reply, strict=False))}

    async def _get(self, name: str) -> tuple[int, dict[str, Any]]:
        reply = await self._call(*(part.replace(self.name, name) for part in self.read))
        if isinstance(reply, dict):  # HGETALL, as redis-py returns it
            if not reply:
                return 404, {"detail": f"stream {name!r} does not exist"}
            return 200, {"name": name, **reply}
        if reply[0] is None:
            return 404, {"detail": f"stream {name!r} does not exist"}
        return 200, {"name": name, **dict(zip(self.fields, reply, strict=True))}

    async def _call(self, *argv: str) -> Any:
        """One command, as redis-py sends any: a single round trip, reply decoded to str."""
        assert self.client is not None
        return await self.client.execute_command(*argv)  # type: ignore[no-untyped-call]

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.name = os.environ["BENCH_NAME"]
                    self.push = json.loads(os.environ["BENCH_PUSH"])
                    self.per_value = json.loads(os.environ["BENCH_PER_VALUE"])
                    self.read = json.loads(os.environ["BENCH_READ"])
                    # HMGET key field...: the fields; HGETALL key: none.
                    self.fields = self.read[2:]
                    # The service's own connection class: the floor packs commands as fast.
                    self.client = Redis.from_url(
                        os.environ["REDIS_URL"],
                        decode_responses=True,
                        encoding_errors="surrogateescape",  # as the service: push.lua's `s`
                        max_connections=512,
                        connection_class=HiredisPackedConnection,
                    )
                    await self.client.ping()
                except Exception as error:
                    await send({"type": "lifespan.startup.failed", "message": repr(error)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message: Message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _samples(data: dict[str, Any], per_value: list[str]) -> list[str]:
    """push.lua's trailing ARGV: each value as the service formats it (repr of the float),
    followed by `per_value`."""
    values = data["values"] if "values" in data else [data["value"]]
    if not isinstance(values, list) or not values:
        raise ValueError("no values")
    args = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError("values must be numbers")
        args.append(repr(float(value)))
        args += per_value
    return args


app = Floor()
