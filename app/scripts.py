"""The service's Lua scripts: loaded from `app/lua/`, registered once per client, called through
typed wrappers.

redis-py's `Script` calls EVALSHA and, on NOSCRIPT (a restarted or failed-over Redis has an empty
script cache), loads the script and retries once, so the cache never needs warming by hand.
"""

from collections.abc import Sequence
from importlib.resources import files
from typing import cast

from redis.asyncio import Redis

# The order of the hash fields in push.lua's reply, and in the HMGET of a read.
STATE_FIELDS = ("d", "i", "a", "v", "n", "l", "u", "t", "b", "p")

Fields = list[str | None]


def load_source(name: str) -> str:
    return files("app").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def format_number(x: float) -> str:
    """The shortest decimal that reads back as exactly `x` (Lua's tonumber is strtod)."""
    return repr(x)


class Scripts:
    """Typed handles on the Lua scripts, bound to one Redis client."""

    def __init__(self, client: "Redis") -> None:
        self._push = client.register_script(load_source("push"))

    async def push(
        self,
        key: str,
        *,
        create_with: tuple[float, float | None, bool] | None,
        samples: Sequence[tuple[float, int | None]],
    ) -> Fields:
        """Apply `samples` (value, num_updates) in order; create the stream from the default
        (decay, initial, auto_num_updates) when it is missing and `create_with` is given."""
        decay, initial, auto = create_with or (1.0, None, False)
        args: list[str] = [
            "1" if create_with else "0",
            format_number(decay),
            "" if initial is None else format_number(initial),
            "1" if auto else "0",
        ]
        for value, num_updates in samples:
            args.append(format_number(value))
            args.append("" if num_updates is None else str(num_updates))
        return cast(Fields, await self._push(keys=[key], args=args))
