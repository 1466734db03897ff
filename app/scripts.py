"""The push script, `app/lua/push.lua`: registered once on the Redis client, with the arguments
that are the same for every push (the defaults a push creates a stream with, the clock skew
allowed) encoded once.

A push is sent as EVALSHA; on NOSCRIPT (a restarted or failed-over Redis has an empty script
cache, and the command did not run) the script is loaded and called again, as redis-py's
`Script` does, so the cache never needs warming by hand. The pushes that find it missing at the
same time (after a restart, a whole burst) share one load.
"""

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from typing import cast

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import NoScriptError

from app.codec import decode_fields, encode_fields, number, numbers
from app.models import Samples
from app.pipelining import CommandSender

# From this many samples a push's values are formatted at once (codec.numbers): below it, that
# costs more than it saves.
_MANY = 8


def load_source(name: str) -> str:
    return files("app").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Idempotency:
    """An idempotency record's key, the request's fingerprint, and how long to keep it."""

    key: str
    fingerprint: str
    seconds: int


class PushScript:
    """push.lua on one client. A push is `call` (its KEYS and ARGV), then `run` (alone) or an
    EVALSHA of `sha` in a pipeline, whose reply `push_reply` reads."""

    def __init__(
        self,
        client: "Redis | RedisCluster",
        *,
        create_with: Mapping[str, str] | None,
        max_clock_skew: float,
        commands: CommandSender | None = None,
    ) -> None:
        """`create_with`: the hash a push to a missing stream creates it with; None makes such
        a push fail (EMA_NOT_FOUND). `commands`: what `run` sends its EVALSHA through (the
        store's auto-pipeline), the client itself by default."""
        self._client = client
        self._commands: CommandSender = client if commands is None else commands
        self._script = client.register_script(load_source("push"))
        self._create = ["0" if create_with is None else "1", encode_fields(create_with or {})]
        self._max_clock_skew = number(max_clock_skew)
        self._loading: asyncio.Future[None] | None = None
        self._loads = 0  # the loads finished so far

    @property
    def sha(self) -> str:
        return self._script.sha

    @property
    def source(self) -> str:
        return str(self._script.script)

    def call(
        self,
        keys: tuple[str, str],
        samples: Samples,
        *,
        idempotency: Idempotency | None,
        channel: str | None,
    ) -> tuple[list[str], list[str]]:
        """The KEYS and ARGV that apply `samples` in order to the stream whose hash and history
        are `keys`, announcing the update on `channel`."""
        args = [
            *self._create,
            idempotency.fingerprint if idempotency else "",
            str(idempotency.seconds) if idempotency else "0",
            channel or "",
            self._max_clock_skew,
        ]
        values, steps, times = samples.values, samples.num_updates, samples.timestamps
        count = len(values)
        texts = numbers(values) if count >= _MANY else [number(value) for value in values]
        if steps is None and times is None:
            # The values alone (push.lua's width 1): most pushes, batches of plain numbers.
            args.append("1")
            args += texts
        else:
            args.append("3")
            columns = [""] * (3 * count)
            columns[0::3] = texts
            if steps is not None:
                columns[1::3] = ["" if n is None else str(n) for n in steps]
            if times is not None:
                columns[2::3] = ["" if t is None else number(t) for t in times]
            args += columns
        all_keys = [*keys, idempotency.key] if idempotency else list(keys)
        return all_keys, args

    async def run(self, keys: list[str], args: list[str]) -> str:
        """One `call` on its own: its reply, which `push_reply` reads."""
        # EVALSHA itself, as redis-py's Script would send it, without its per-call overhead.
        command: tuple[str | int, ...] = (self._script.sha, len(keys), *keys, *args)
        loads = self._loads
        try:
            reply = await self._commands.execute_command("EVALSHA", *command)
        except NoScriptError:
            # Refused before any load that has finished since it was sent (else it would have
            # run): such a load answers it too, as one still on its way does.
            if self._loads == loads:
                await self.load()
            reply = await self._commands.execute_command("EVALSHA", *command)
        return cast(str, reply)

    async def load(self) -> None:
        """Load the script into Redis' cache: one SCRIPT LOAD for all the pushes that find it
        missing meanwhile (a push refused with NOSCRIPT ran before any load still on its way,
        so that load answers it too)."""
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self._load_once())
            # Retrieved here too: every push waiting on it may have been cancelled.
            self._loading.add_done_callback(lambda load: load.cancelled() or load.exception())
        await asyncio.shield(self._loading)  # a push cancelled does not cancel the others' load

    async def _load_once(self) -> None:
        await self._client.script_load(self.source)
        self._loads += 1


_REPLAYED = "replayed\n"


def push_reply(reply: object) -> tuple[dict[str, str], bool]:
    """The stream's hash fields from a push's reply (see push.lua's header), and whether it was
    an idempotent replay."""
    text, replayed = push_reply_text(reply)
    return decode_fields(text), replayed


def push_reply_text(reply: object) -> tuple[str, bool]:
    """A push's reply without the mark of an idempotent replay, and whether it was one."""
    text = cast(str, reply)
    replayed = is_replay(text)
    return text.removeprefix(_REPLAYED), replayed


def is_replay(reply: str) -> bool:
    """Whether a push's reply is the stored reply of an earlier push with the same idempotency
    key (which was not applied again)."""
    return reply.startswith(_REPLAYED)
