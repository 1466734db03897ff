"""The service's Lua scripts: loaded from `app/lua/`, registered once per client, called through
typed wrappers.

redis-py's `Script` calls EVALSHA and, on NOSCRIPT (a restarted or failed-over Redis has an empty
script cache), loads the script and retries once, so the cache never needs warming by hand.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import cast

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError

from app.codec import decode_fields, encode_fields, number
from app.models import Triple


def load_source(name: str) -> str:
    return files("app").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Idempotency:
    """An idempotency record's key, the request's fingerprint, and how long to keep it."""

    key: str
    fingerprint: str
    seconds: int


class Scripts:
    """Typed handles on the Lua scripts, bound to one Redis client."""

    def __init__(self, client: "Redis | RedisCluster") -> None:
        self._client = client
        self._push = client.register_script(load_source("push"))

    @property
    def push_sha(self) -> str:
        return self._push.sha

    @property
    def push_source(self) -> str:
        return str(self._push.script)

    async def push(
        self,
        keys: tuple[str, str],
        samples: Sequence[Triple],
        *,
        create_with: Mapping[str, str] | None,
        idempotency: Idempotency | None,
        channel: str | None,
        max_clock_skew: float,
    ) -> tuple[dict[str, str], bool]:
        """Apply `samples` (value, num_updates, timestamp) in order, creating the stream with the
        hash `create_with` if it is missing. Returns the stream's hash fields, and whether they
        are the stored reply of an earlier push with the same idempotency key."""
        all_keys, args = self.push_call(
            keys,
            samples,
            create_with=create_with,
            idempotency=idempotency,
            channel=channel,
            max_clock_skew=max_clock_skew,
        )
        # EVALSHA itself, as redis-py's Script would send it, without its per-call overhead; a
        # NOSCRIPT (an emptied script cache) did not run: load the script and call it again.
        command: tuple[str | int, ...] = (
            "EVALSHA",
            self._push.sha,
            len(all_keys),
            *all_keys,
            *args,
        )
        try:
            reply = await self._client.execute_command(*command)
        except NoScriptError:
            await self._client.script_load(self.push_source)
            reply = await self._client.execute_command(*command)
        return push_reply(reply)

    def push_call(
        self,
        keys: tuple[str, str],
        samples: Sequence[Triple],
        *,
        create_with: Mapping[str, str] | None,
        idempotency: Idempotency | None,
        channel: str | None,
        max_clock_skew: float,
    ) -> tuple[list[str], list[str]]:
        """The KEYS and ARGV of `push`, for a pipeline: EVALSHA push_sha len(KEYS) *KEYS *ARGV;
        its reply is read with `push_reply`."""
        args: list[str] = [
            "0" if create_with is None else "1",
            encode_fields(create_with or {}),
            idempotency.fingerprint if idempotency else "",
            str(idempotency.seconds) if idempotency else "0",
            channel or "",
            number(max_clock_skew),
        ]
        for value, num_updates, timestamp in samples:
            args.append(number(value))
            args.append("" if num_updates is None else str(num_updates))
            args.append("" if timestamp is None else number(timestamp))
        all_keys = [*keys, idempotency.key] if idempotency else list(keys)
        return all_keys, args


_REPLAYED = "replayed\n"


def push_reply(reply: object) -> tuple[dict[str, str], bool]:
    """The stream's hash fields from a push's reply (see push.lua's header), and whether it was
    an idempotent replay."""
    text = cast(str, reply)
    replayed = text.startswith(_REPLAYED)
    return decode_fields(text.removeprefix(_REPLAYED)), replayed
