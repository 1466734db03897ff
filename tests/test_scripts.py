"""push.lua on its own: its guards against what Lua's tonumber lets through, exact number
round-trips, and recovery from an emptied script cache."""

import asyncio
import hashlib
import random
import struct

import httpx
import pytest
import redis

from app.codec import state_numbers
from app.scripts import load_source, push_reply
from tests.reference import ReferenceEma
from tests.utils import snapshot

KEY = "test:{s}"
HISTORY = "test:{s}:history"
# create with decay 0.5; no idempotency record; no channel; timestamps up to an hour ahead;
# samples as triples (value, num_updates, timestamp)
CREATE = ["1", "d=0.5;n=0;b=0;p=1;a=0;h=0", "", "0", "", "3600", "3"]


def run(client: "redis.Redis", *args: str) -> dict[str, str | float]:
    """The stream's fields after a push: its configuration and count, and its state's numbers
    by field name."""
    fields, replayed = push_reply(client.eval(load_source("push"), 2, KEY, HISTORY, *args))
    assert not replayed
    return {**fields, **state_numbers(fields)}


@pytest.mark.parametrize(
    "value",
    [
        *["nan", "-nan", "inf", "-inf", "1e400", "0x10", " 5 ", "5 ", "", "1,5", "five"],
        # digits, points, exponent signs in the wrong places (strtod would read a prefix)
        *["5e", "1e+", "5.+3", "1.2.3", "5-", "+5", ".5", "-.5", "--5", "1e5.0"],
    ],
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


@pytest.mark.parametrize("value", ["5.", "1e5", "1E-05", "-0.0", "-0", "1.5e+300", "5e-324", "007"])
def test_script_reads_every_plain_decimal_exactly(redis_client: "redis.Redis", value: str) -> None:
    fields = run(redis_client, *CREATE, value, "", "")
    assert struct.pack("<d", float(fields["l"])) == struct.pack("<d", float(value))


@pytest.mark.parametrize("num_updates", ["-1", "1.5", "1e16", "nan", "0x1", " 1"])
def test_script_rejects_bad_num_updates(redis_client: "redis.Redis", num_updates: str) -> None:
    with pytest.raises(redis.ResponseError, match="EMA_INVALID"):
        run(redis_client, *CREATE, "2.0", num_updates, "")
    assert redis_client.keys("*") == []


def test_script_refuses_to_create_when_told_not_to(redis_client: "redis.Redis") -> None:
    with pytest.raises(redis.ResponseError, match="EMA_NOT_FOUND"):
        run(redis_client, "0", *CREATE[1:], "1.0", "", "")
    assert redis_client.keys("*") == []


def test_script_needs_whole_samples_of_a_known_width(redis_client: "redis.Redis") -> None:
    values_alone = [*CREATE[:-1], "1"]
    for args in (
        CREATE,
        [*CREATE, "1.0"],
        [*CREATE, "1.0", ""],
        [*CREATE, "1.0", "", "", "2.0"],
        values_alone,
        CREATE[:-1],
        *([*CREATE[:-1], width, "1.0", "", ""] for width in ("2", "0", "", "x", "3.5")),
    ):
        with pytest.raises(redis.ResponseError, match="EMA_INVALID"):
            run(redis_client, *args)
    assert redis_client.keys("*") == []


def test_values_alone_apply_as_triples_without_num_updates_or_timestamps(
    redis_client: "redis.Redis",
) -> None:
    values = ["1.5", "-2", "1e-300", "7"]
    alone = run(redis_client, *CREATE[:-1], "1", *values)
    redis_client.delete(KEY, HISTORY)
    triples = run(redis_client, *CREATE, *(part for value in values for part in (value, "", "")))
    for fields in (alone, triples):
        del fields["t"], fields["E"], fields["s"]  # the server's clock at each push, packed too
    assert alone == triples
    assert alone["n"] == "4"


def test_a_bad_value_alone_is_named_by_its_index(redis_client: "redis.Redis") -> None:
    with pytest.raises(redis.ResponseError, match=r"EMA_INVALID values\[2\]: not a finite number"):
        run(redis_client, *CREATE[:-1], "1", "1.0", "2.0", "nan", "4.0")
    with pytest.raises(redis.ResponseError, match=r"EMA_INVALID values\[1\]: not a finite number"):
        run(redis_client, *CREATE, "1.0", "", "", "nan", "", "")
    assert redis_client.keys("*") == []


def stored_state(client: "redis.Redis") -> bytes:
    """The stream's packed state as bytes: `s`, then `s1`, `s2`, ... (64 bytes each at most)."""
    fields = client.hgetall(KEY)
    chunks = [fields[name] for name in ["s"] + [f"s{i}" for i in range(1, 9)] if name in fields]
    assert all(len(c.encode("utf-8", "surrogateescape")) <= 64 for c in chunks)
    return "".join(chunks).encode("utf-8", "surrogateescape")


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
        for text in (reply["v"], reply["l"]):
            assert struct.pack("<d", float(text)) == struct.pack("<d", value)
        # s packs t, l, u, b, p, v, then E (a timestamp: it differs from t)
        # b, p, q, w, z, v, t, l, then u (the decay) and E (a timestamp: it differs from t)
        packed = stored_state(redis_client)
        assert len(packed) == 10 * 8
        assert packed[40:48] == packed[56:64] == struct.pack("<d", value)
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


@pytest.mark.anyio
async def test_a_burst_after_an_emptied_script_cache_loads_the_script_once(
    client: httpx.AsyncClient, redis_client: "redis.Redis"
) -> None:
    assert (await client.post("/v1/streams/s/values", json={"value": 1})).status_code == 200
    redis_client.script_flush()
    redis_client.config_resetstat()
    pushes = [client.post("/v1/streams/s/values", json={"value": 3}) for _ in range(50)]
    responses = await asyncio.gather(*pushes)
    assert sorted(response.json()["count"] for response in responses) == list(range(2, 52))
    loads = redis_client.info("commandstats")["cmdstat_script|load"]["calls"]
    assert loads == 1


def test_a_stream_in_the_text_layout_is_read_and_rewritten_packed(
    redis_client: "redis.Redis",
) -> None:
    # Written with raw HSETs exactly as push.lua did before the packed state `s` existed: state
    # as shortest-decimal text fields. The next push reads them, applies, and leaves `s` alone.
    main, fast = ReferenceEma(0.9), ReferenceEma(0.5)
    for value in (3.25, 1 / 3):
        main.push(value)
        fast.push(value)
    assert main.shadow is not None
    assert fast.shadow is not None
    old = {
        "n": "2", "h": "0", "d": "0.9", "b": repr(main.zero_started), "p": repr(main.decay_product),
        "a": "0", "W": "fast:d0.5", "v": repr(main.shadow), "v:fast": repr(fast.shadow),
        "u": repr(main.decay_used), "l": repr(1 / 3), "t": "1764000000.25", "E": "1764000000.25",
    }  # fmt: skip
    redis_client.hset(KEY, mapping=old)
    main.push(0.1)
    fast.push(0.1)
    fields = run(redis_client, *CREATE, "0.1", "", "")
    assert float(fields["v"]) == main.shadow
    assert float(fields["v:fast"]) == fast.shadow
    assert (float(fields["b"]), float(fields["p"])) == (main.zero_started, main.decay_product)
    assert (fields["n"], float(fields["l"]), float(fields["u"])) == ("3", 0.1, 0.9)
    assert sorted(redis_client.hkeys(KEY)) == ["W", "a", "d", "h", "n", "s", "s1"]
    # b p q w z v v:fast t l, and u E m: the spread starts with this push, m differs from v
    assert len(stored_state(redis_client)) == 12 * 8
    assert float(run(redis_client, *CREATE, "0.2", "", "")["v"]) == main.shadow - 0.1 * (
        main.shadow - 0.2
    )


def test_a_halflife_stream_in_the_text_layout_is_read_and_rewritten_packed(
    redis_client: "redis.Redis",
) -> None:
    old = {"n": "1", "h": "0", "H": "60", "S": "2.5", "Z": "1", "u": "1", "l": "2.5",
           "t": "1764000000.5", "E": "1764000000"}  # fmt: skip
    redis_client.hset(KEY, mapping=old)
    fields = run(redis_client, *CREATE, "4", "", "1764000030")
    shrink = 2 ** ((1764000000 - 1764000030) / 60)
    assert (float(fields["S"]), float(fields["Z"])) == (2.5 * shrink + 4.0, shrink + 1.0)
    assert (float(fields["E"]), float(fields["u"])) == (1764000030.0, shrink)
    assert sorted(redis_client.hkeys(KEY)) == ["H", "h", "n", "s", "s1"]
    assert len(stored_state(redis_client)) == 9 * 8  # q w z S Z t l u E
