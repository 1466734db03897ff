"""The hot paths' JSON (codec.state_json, built without the models) is the models' JSON."""

import struct
from collections.abc import Iterator

import pytest
import redis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app import codec
from app.codec import (
    RecentReplies,
    config_fields,
    decode_fields,
    encode_fields,
    reply_json,
    state_from_fields,
    state_json,
)
from app.models import StreamConfig
from app.scripts import load_source
from tests.redis_server import RedisServer

numbers = st.floats(allow_nan=False, width=64)  # infinities too: an overflowed sum
positive = st.floats(min_value=1e-3, max_value=1e6)
windows = st.lists(
    st.builds(
        lambda name, decay, halflife: (
            {"name": name, "decay": decay}
            if decay is not None
            else {"name": name, "halflife": halflife}
        ),
        st.from_regex(r"[a-z0-9]{1,4}", fullmatch=True),
        st.none() | st.floats(min_value=0, max_value=1),
        positive,
    ),
    max_size=3,
    unique_by=lambda w: w["name"],
)


@st.composite
def configs(draw: st.DrawFn) -> StreamConfig:
    """Valid configurations of every kind (an invalid combination drawn is discarded)."""
    halflife = draw(st.none() | positive)
    body: dict[str, object] = {
        "kind": draw(st.sampled_from(["mean", "rate"])),
        "windows": draw(windows) or None,
        "ttl": draw(st.none() | st.integers(1, 10**6)),
        "history": draw(st.integers(0, 1000)),
        "late": draw(st.sampled_from(["merge", "reject"])),
        "arithmetic": draw(
            st.sampled_from(["float64", "tensorflow-float64", "tensorflow-float32"])
        ),
    }
    if halflife is None:
        body |= {"decay": draw(st.floats(0, 1)), "initial": draw(st.none() | st.floats(-1e9, 1e9))}
    else:
        body["halflife"] = halflife
    try:
        return StreamConfig.model_validate(body)
    except ValidationError:
        assume(False)
        raise


@given(configs(), st.integers(0, 10**9), st.data())
def test_state_json_is_the_models_json(
    config: StreamConfig, count: int, data: st.DataObject
) -> None:
    fields = config_fields(config)
    fields["n"] = str(count)
    names = ["", *(f":{w.name}" for w in config.windows or [])]
    for suffix in names if count else []:
        for field in ("v", "b", "p", "S", "Z") if suffix == "" else ("v", "S", "Z"):
            fields[field + suffix] = repr(data.draw(numbers))
    if count:  # the spread: V is "q,w" (q may round below zero), M is "m,z"
        q, w = repr(data.draw(numbers)), repr(data.draw(st.floats(min_value=0)))
        m, z = (repr(data.draw(numbers)) for _ in range(2))
        fields["V"], fields["M"] = f"{q},{w}", f"{m},{z}"
    if count:
        for field in ("l", "u", "t", "E"):
            fields[field] = repr(data.draw(numbers.filter(lambda x: abs(x) < 1e12)))
    now = data.draw(st.none() | st.floats(min_value=0, max_value=2e9))
    try:
        expected = state_from_fields("s", fields, now).model_dump_json().encode()
    except (OverflowError, ZeroDivisionError):  # sums no push leaves
        return
    assert state_json("s", fields, now) == expected


@pytest.fixture(scope="module")
def raw(redis_server: RedisServer) -> Iterator["redis.Redis"]:
    with redis_server.client() as client:
        yield client


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    configs(),
    st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=1, max_size=3),
    st.sampled_from(["s", "a:b/c", "é"]),
)
def test_a_push_reply_reads_as_the_state_of_its_fields(
    raw: "redis.Redis", config: StreamConfig, values: list[float], name: str
) -> None:
    """reply_json, which reads a push's reply (and announcement) straight from its text, says
    what state_json says of the same text's fields: for every configuration push.lua writes,
    windows and all."""
    keys = ("codec:{s}", "codec:{s}:history")
    raw.delete(*keys)
    create = encode_fields(config_fields(config))
    try:
        reply = raw.eval(
            load_source("push"), 2, *keys, "1", create, "", "0", "", "3600", "1", *map(repr, values)
        )
    except redis.ResponseError:  # refused (a rate's negative value, ...): no state to read
        assume(False)
    fields = decode_fields(reply)
    assert reply_json(name, reply) == (int(fields["n"]), state_json(name, fields))
    assert fields["n"] == str(len(values))
    # What a reset announces: the stream's fields before any value.
    assert reply_json(name, create) == (0, state_json(name, decode_fields(create)))


def test_a_variance_rounded_below_zero_has_no_deviation() -> None:
    # What a late sample's Welford step can leave (it answered 500 before).
    fields = config_fields(StreamConfig(halflife=10))
    fields |= {"n": "3", "S": "3.0", "Z": "2.0", "t": "1.0", "E": "1.0", "V": "-1e-17,0.5"}
    state = state_from_fields("s", fields)
    assert state.variance is not None
    assert state.variance < 0
    assert state.std is None
    assert state_json("s", fields) == state.model_dump_json().encode()


def test_recent_replies_are_kept_only_while_wanted_and_only_the_newest() -> None:
    replies = RecentReplies(limit=2)
    replies.keep("s", "a", 1, b"A")
    assert replies.take("s", "a") is None  # not wanted: not kept
    replies.wanted = True
    for count, text in enumerate("abc", 1):
        replies.keep("s", text, count, text.upper().encode())
    assert replies.take("s", "a") is None  # the oldest went over the limit
    assert replies.take("t", "c") is None  # another stream's, in the same state
    assert replies.take("s", "c") == (3, b"C")
    assert replies.take("s", "c") is None  # taken once
    replies.wanted = False
    assert len(replies) == 0


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=50))
def test_numbers_are_decimals_that_read_back_bit_for_bit(xs: list[float]) -> None:
    edges = [5e-324, -0.0, 0.0, 1e16, 1e-7, 1.7976931348623157e308, 2.2250738585072014e-308]
    for x, text in zip(xs + edges, codec.numbers(xs + edges), strict=True):
        assert struct.pack("<d", float(text)) == struct.pack("<d", x)  # bit for bit, -0.0 too
