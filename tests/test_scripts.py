"""push.lua on its own: its guards against what Lua's tonumber lets through, exact number
round-trips, and recovery from an emptied script cache."""

import hashlib
import random
import struct

import httpx
import pytest
import redis

from app.scripts import load_source
from tests.utils import snapshot

KEY = "test:{s}"
HISTORY = "test:{s}:history"
# create with decay 0.5; no idempotency record; no channel; timestamps up to an hour ahead
CREATE = ["1", "d=0.5;n=0;b=0;p=1;a=0;h=0", "", "0", "", "3600"]


def run(client: "redis.Redis", *args: str) -> dict[str, str]:
    reply: list[str] = client.eval(load_source("push"), 2, KEY, HISTORY, *args)
    assert reply[-1] == "0"
    return dict(zip(reply[:-1:2], reply[1:-1:2], strict=True))


@pytest.mark.parametrize(
    "value", ["nan", "-nan", "inf", "-inf", "1e400", "0x10", " 5 ", "5 ", "", "1,5", "five"]
)
def test_script_rejects_what_tonumber_would_accept(redis_client: "redis.Redis", value: str) -> None:
    run(redis_client, *CREATE, "1.0", "", "")
    before = snapshot(redis_client)
    with pytest.raises(redis.ResponseError, match="EMA_INVALID"):
        run(redis_client, *CREATE, "2.0", "", "", value, "", "")
    if value:  # an empty timestamp means "none": server time
        with pytest.raises(redis.ResponseError, match="EMA_INVALID"):
            run(redis_client, *CREATE, "2.0", "", "", "3.0", "", value)
    assert snapshot(redis_client) == before


@pytest.mark.parametrize("num_updates", ["-1", "1.5", "1e16", "nan", "0x1", " 1"])
def test_script_rejects_bad_num_updates(redis_client: "redis.Redis", num_updates: str) -> None:
    with pytest.raises(redis.ResponseError, match="EMA_INVALID"):
        run(redis_client, *CREATE, "2.0", num_updates, "")
    assert redis_client.keys("*") == []


def test_script_refuses_to_create_when_told_not_to(redis_client: "redis.Redis") -> None:
    with pytest.raises(redis.ResponseError, match="EMA_NOT_FOUND"):
        run(redis_client, "0", *CREATE[1:], "1.0", "", "")
    assert redis_client.keys("*") == []


def test_script_needs_pairs(redis_client: "redis.Redis") -> None:
    for args in (CREATE, [*CREATE, "1.0"], [*CREATE, "1.0", ""]):
        with pytest.raises(redis.ResponseError, match="EMA_INVALID"):
            run(redis_client, *args)


def random_double(rng: random.Random) -> float:
    while True:
        (x,) = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))
        if x == x and abs(x) < 1e300:
            return float(x)


def test_numbers_round_trip_bit_for_bit(redis_client: "redis.Redis") -> None:
    # The first value seeds a stream without initial: what goes in must come back, bit for bit,
    # across every exponent (the Lua reply is a string: a Lua number would be truncated).
    rng = random.Random(7)
    values = [random_double(rng) for _ in range(2000)] + [5e-324, -0.0, 0.1, 1 / 3, 2**53 + 1.0]
    for value in values:
        redis_client.delete(KEY)
        reply = run(redis_client, *CREATE, repr(value), "", repr(abs(value) % 1e9))
        stored = redis_client.hmget(KEY, "v", "l")
        for text in (reply["v"], reply["l"], *stored):
            assert text is not None
            assert struct.pack("<d", float(text)) == struct.pack("<d", value)
        assert float(reply["E"]) == abs(value) % 1e9


@pytest.mark.anyio
async def test_push_survives_an_emptied_script_cache(
    client: httpx.AsyncClient, redis_client: "redis.Redis"
) -> None:
    sha = hashlib.sha1(load_source("push").encode()).hexdigest()
    assert (await client.post("/v1/streams/s/values", json={"value": 1})).status_code == 200
    assert redis_client.script_exists(sha) == [True]
    redis_client.script_flush()
    assert redis_client.script_exists(sha) == [False]
    response = await client.post("/v1/streams/s/values", json={"value": 3})
    assert response.status_code == 200
    assert response.json()["count"] == 2
    assert redis_client.script_exists(sha) == [True]
