"""The service's Lua scripts: loaded from `app/lua/`, registered once per client, called through
typed wrappers.

redis-py's `Script` calls EVALSHA and, on NOSCRIPT (a restarted or failed-over Redis has an empty
script cache), loads the script and retries once, so the cache never needs warming by hand.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import cast

from redis.asyncio import Redis

# The order of the hash fields in push.lua's reply, in its announcements, and in a read's HMGET.
STATE_FIELDS = ("d", "i", "a", "h", "v", "n", "l", "u", "t", "b", "p")

Fields = list[str | None]


def load_source(name: str) -> str:
    return files("app").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def format_number(x: float) -> str:
    """The shortest decimal that reads back as exactly `x` (Lua's tonumber is strtod)."""
    return repr(x)


@dataclass(frozen=True)
class Defaults:
    """The configuration a push gives a stream it creates."""

    decay: float
    initial: float | None
    auto_num_updates: bool
    history: int


@dataclass(frozen=True)
class Idempotency:
    """An idempotency record's key, the request's fingerprint, and how long to keep it."""

    key: str
    fingerprint: str
    seconds: int


class Scripts:
    """Typed handles on the Lua scripts, bound to one Redis client."""

    def __init__(self, client: "Redis") -> None:
        self._push = client.register_script(load_source("push"))

    async def push(
        self,
        keys: tuple[str, str],
        samples: Sequence[tuple[float, int | None]],
        *,
        create_with: Defaults | None,
        idempotency: Idempotency | None,
        channel: str | None,
    ) -> tuple[Fields, bool]:
        """Apply `samples` (value, num_updates) in order. Returns the stream's fields and whether
        they are the stored reply of an earlier push with the same idempotency key."""
        defaults = create_with or Defaults(1.0, None, False, 0)
        args: list[str] = [
            "1" if create_with else "0",
            format_number(defaults.decay),
            "" if defaults.initial is None else format_number(defaults.initial),
            "1" if defaults.auto_num_updates else "0",
            str(defaults.history),
            idempotency.fingerprint if idempotency else "",
            str(idempotency.seconds) if idempotency else "0",
            channel or "",
        ]
        for value, num_updates in samples:
            args.append(format_number(value))
            args.append("" if num_updates is None else str(num_updates))
        all_keys = [*keys, idempotency.key] if idempotency else list(keys)
        reply = cast(Fields, await self._push(keys=all_keys, args=args))
        return reply[: len(STATE_FIELDS)], reply[len(STATE_FIELDS)] == "1"
