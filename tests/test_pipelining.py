"""Auto-pipelining on a real redis-server: the commands of one event-loop turn reach Redis in one
write (Redis' own read counters show it), each keeps its own reply or error, and a failed or
abandoned batch never shifts replies onto the wrong commands."""

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis

from app.main import redis_client
from app.pipelining import AutoPipeline
from tests.redis_server import RedisServer
from tests.utils import make_settings, serve

pytestmark = pytest.mark.anyio

# Keeps Redis busy for ARGV[1] milliseconds, within one command.
_SPIN = """
local function now() local t = redis.call('TIME') return t[1] * 1000 + t[2] / 1000 end
local start = now()
while now() - start < tonumber(ARGV[1]) do end
return 1"""


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.kill()


@asynccontextmanager
async def client_of(server: RedisServer, seconds: float = 2.0) -> AsyncIterator[Redis]:
    """The service's own kind of client (hiredis packing, no retries), timing out after
    `seconds`."""
    client = redis_client(server.url, make_settings(server.url, redis_timeout=seconds))
    assert isinstance(client, Redis)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def service_client(own_redis: RedisServer) -> AsyncIterator[Redis]:
    async with client_of(own_redis) as client:
        yield client


class Counters:
    """Redis' own counts, read on a connection of its own opened once (opening one costs
    reads too): socket reads processed, and calls of a command."""

    def __init__(self, server: RedisServer) -> None:
        self.client = server.client()

    def read(self, command: str) -> tuple[int, int]:
        """The reads so far (each read of this call included, so a delta counts one more
        read per call: one), and the calls of `command`."""
        stats: dict[str, Any] = self.client.info("commandstats")
        reads = int(self.client.info("stats")["total_reads_processed"])
        return reads, int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


@pytest.fixture
def counters(own_redis: RedisServer) -> Iterator[Counters]:
    counters = Counters(own_redis)
    yield counters
    counters.client.close()


async def test_one_turns_commands_go_in_one_write(
    counters: Counters, service_client: Redis
) -> None:
    pipeline = AutoPipeline(service_client)
    assert await pipeline.execute_command("PING") is True  # connected
    reads, calls = counters.read("incr")
    replies = await asyncio.gather(*(pipeline.execute_command("INCR", "n") for _ in range(200)))
    after_reads, after_calls = counters.read("incr")
    assert replies == list(range(1, 201))  # each its own reply, in the order they were sent
    assert after_calls - calls == 200
    # One write of 200 commands (4.6 kB): one read by Redis (a few if it arrived in parts),
    # and the two reads of the counters' own INFO calls.
    assert after_reads - reads <= 2 + 3


async def test_concurrent_pushes_and_gets_share_writes(
    own_redis: RedisServer, counters: Counters
) -> None:
    settings = make_settings(own_redis.url)
    async for client in serve(settings):
        await client.put("/v1/streams/cpu", json={"decay": 0.5, "initial": 0})
        await client.post("/v1/streams/warm/values", json={"value": 1})  # loads the script
        reads, calls = counters.read("evalsha")
        pushes = [client.post("/v1/streams/cpu/values", json={"value": 1}) for _ in range(64)]
        responses = await asyncio.gather(*pushes)
        after_reads, after_calls = counters.read("evalsha")
        assert {response.status_code for response in responses} == {200}
        assert sorted(response.json()["count"] for response in responses) == list(range(1, 65))
        assert after_calls - calls == 64
        assert after_reads - reads < 64 // 4  # without coalescing: at least 64 (+1, INFO)

        reads, calls = counters.read("hgetall")
        responses = await asyncio.gather(*(client.get("/v1/streams/cpu") for _ in range(64)))
        after_reads, after_calls = counters.read("hgetall")
        assert {response.json()["count"] for response in responses} == {64}
        assert after_calls - calls == 64
        assert after_reads - reads < 64 // 4


async def test_an_error_reply_fails_its_own_command_only(service_client: Redis) -> None:
    pipeline = AutoPipeline(service_client)
    await pipeline.execute_command("SET", "text", "1")
    replies = await asyncio.gather(
        pipeline.execute_command("GET", "text"),
        pipeline.execute_command("HGETALL", "text"),
        pipeline.execute_command("EVALSHA", "0" * 40, 0),
        pipeline.execute_command("EVAL", "return redis.error_reply('EMA_INVALID no')", 0),
        pipeline.execute_command("HGETALL", "missing"),
        pipeline.execute_command("TIME"),
        return_exceptions=True,
    )
    text, wrong_type, no_script, refused, missing, now = replies
    assert text == "1"
    assert isinstance(wrong_type, redis.ResponseError)
    assert "WRONGTYPE" in str(wrong_type)
    assert isinstance(no_script, redis.exceptions.NoScriptError)
    assert isinstance(refused, redis.ResponseError)
    assert str(refused) == "EMA_INVALID no"
    assert missing == {}  # parsed as the client parses it
    assert isinstance(now, tuple)
    assert len(now) == 2


async def test_cancelled_waiters_never_shift_replies(service_client: Redis) -> None:
    pipeline = AutoPipeline(service_client)
    await asyncio.gather(*(pipeline.execute_command("SET", f"k{i}", str(i)) for i in range(20)))
    slow = asyncio.ensure_future(pipeline.execute_command("EVAL", _SPIN, 0, "300"))
    gets = [asyncio.ensure_future(pipeline.execute_command("GET", f"k{i}")) for i in range(20)]
    await asyncio.sleep(0)  # every command queued; the batch not sent yet
    gets[0].cancel()  # before the batch goes out: never sent
    await asyncio.sleep(0.05)  # the batch sent, Redis busy with its first command
    for get in gets[1::2]:  # while their replies are on their way
        get.cancel()
    assert await slow == 1
    for i, get in enumerate(gets):
        if i % 2 == 0 and i > 0:
            assert await get == str(i)
        else:
            with pytest.raises(asyncio.CancelledError):
                await get
    # The connection went back to the pool with nothing left to read on it.
    assert await asyncio.gather(*(pipeline.execute_command("GET", f"k{i}") for i in range(20))) == [
        str(i) for i in range(20)
    ]


async def test_a_timeout_fails_the_batch_and_the_next_gets_a_fresh_connection(
    own_redis: RedisServer,
) -> None:
    async with client_of(own_redis, seconds=0.3) as client:
        pipeline = AutoPipeline(client)
        await pipeline.execute_command("SET", "k", "v")
        # Longer than the 0.3 s timeout: the batch's replies come after it gave up waiting.
        batch = [pipeline.execute_command("EVAL", _SPIN, 0, "600")]
        batch += [pipeline.execute_command("GET", "k") for _ in range(5)]
        replies = await asyncio.gather(*batch, return_exceptions=True)
        assert all(isinstance(reply, redis.TimeoutError) for reply in replies), replies
        # Late replies of the timed-out batch must not answer these commands.
        for _ in range(20):
            try:
                assert await pipeline.execute_command("GET", "k") == "v"
                break
            except redis.TimeoutError:  # Redis may still be running the script
                await asyncio.sleep(0.1)
        assert await asyncio.gather(
            *(pipeline.execute_command("INCR", "n") for _ in range(5))
        ) == list(range(1, 6))


async def test_a_lost_connection_fails_the_batch_and_the_next_reconnects(
    own_redis: RedisServer, service_client: Redis
) -> None:
    pipeline = AutoPipeline(service_client)
    await pipeline.execute_command("SET", "k", "v")
    own_redis.kill()
    replies = await asyncio.gather(
        *(pipeline.execute_command("GET", "k") for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(reply, redis.ConnectionError) for reply in replies), replies
    own_redis.start()
    assert await asyncio.gather(*(pipeline.execute_command("INCR", "n") for _ in range(5))) == list(
        range(1, 6)
    )
