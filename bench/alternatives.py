"""What a user would write instead of the service's Lua script, to update one moving average
from many clients at once, for bench/scale.py to compare on one hot key. NOT part of the
service: these are the approaches the script replaces.

- naive: read the hash (HGETALL), compute in Python, write it back (HSET). Two clients that
  read the same state both write an update computed from it: one of them is lost.
- optimistic: the same inside WATCH / MULTI / EXEC. A write in between makes EXEC fail and the
  client starts over (a retry): nothing is lost, but a hot key makes most attempts fail.
- lua: the service's own EVALSHA of app/lua/push.lua, as the service sends it: one round trip,
  atomic in Redis, nothing lost, nothing retried.

Each runs `clients` asyncio tasks (one connection each, redis-py's asyncio client, in this one
process) for `seconds`, and reports updates/s, the latency of an update (first attempt to
success), lost updates and retries.
"""

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import WatchError

DECAY = 0.99
VALUE = 1.5


@dataclass(frozen=True)
class HotKeyResult:
    name: str
    updates: int  # acknowledged by Redis (HSET answered, EXEC succeeded, EVALSHA answered)
    seconds: float
    retries: int
    lost: int  # acknowledged updates the stored count does not show
    latencies: Sequence[float]  # seconds, per update

    @property
    def per_second(self) -> float:
        return self.updates / self.seconds

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latencies) * 1e3

    @property
    def p99_ms(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3


def ema(fields: dict[str, str]) -> dict[str, str]:
    """TensorFlow's update of the shadow `v`, and the count `n`, as the script does."""
    shadow = float(fields["v"]) if "v" in fields else VALUE
    shadow -= (1 - DECAY) * (shadow - VALUE)
    return {"v": repr(shadow), "n": str(int(fields.get("n", "0")) + 1)}


async def naive(client: aioredis.Redis, key: str) -> int:
    fields = await client.hgetall(key)
    await client.hset(key, mapping=ema(fields))
    return 0


async def optimistic(client: aioredis.Redis, key: str) -> int:
    retries = 0
    async with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(key)
                fields = await pipe.hgetall(key)
                pipe.multi()
                pipe.hset(key, mapping=ema(fields))
                await pipe.execute()
                return retries
            except WatchError:
                retries += 1


def lua(argv: Sequence[str]) -> Callable[[aioredis.Redis, str], Awaitable[int]]:
    async def update(client: aioredis.Redis, key: str) -> int:
        await client.execute_command(*argv)
        return 0

    return update


async def hot_key(
    port: int,
    name: str,
    key: str,
    update: Callable[[aioredis.Redis, str], Awaitable[int]],
    clients: int,
    seconds: float,
) -> HotKeyResult:
    """`clients` tasks calling `update` on `key` (emptied first) until `seconds` have passed."""
    client = aioredis.Redis(port=port, decode_responses=True, max_connections=clients)
    try:
        await client.delete(key)
        latencies: list[float] = []
        retries = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal retries
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                # Not `retries += await ...`: that reads `retries` before the await and writes
                # it after, losing the other tasks' increments, like the naive update does.
                failed = await update(client, key)
                retries += failed
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - started
        stored = int(await client.hget(key, "n") or 0)
    finally:
        await client.aclose()
    return HotKeyResult(name, len(latencies), elapsed, retries, len(latencies) - stored, latencies)
