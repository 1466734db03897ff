"""The key layout: the name is the cluster hash tag, and listing patterns match only streams."""

import re

import pytest
import redis

from app.keys import NAME_PATTERN, KeyLayout


def test_stream_key_puts_the_name_in_the_hash_tag() -> None:
    layout = KeyLayout("ema:")
    assert layout.stream("cpu.load") == "ema:{cpu.load}"
    assert layout.name_of(layout.stream("cpu.load")) == "cpu.load"


@pytest.mark.parametrize("name", ["cpu", "a.b:c-d_E9", "x" * 200])
def test_valid_names(name: str) -> None:
    assert re.match(NAME_PATTERN, name)


@pytest.mark.parametrize("name", ["", "a{b", "a}b", "a b", "a*", "a?", "a[b]", "ä", "x" * 201])
def test_invalid_names(name: str) -> None:
    assert not re.match(NAME_PATTERN, name)


def test_scan_pattern_matches_streams_only_and_escapes_the_prefix(
    redis_client: "redis.Redis",
) -> None:
    layout = KeyLayout("m*[x]:")
    keys = ["m*[x]:{cpu}", "m*[x]:{cpu.1}", "m*[x]:{cpu}:history", "mm[x]:{cpu}", "m*[x]:{mem}"]
    for key in keys:
        redis_client.set(key, "1")
    matched = set(redis_client.scan_iter(match=layout.scan_pattern("cp"), count=1000))
    assert matched == {"m*[x]:{cpu}", "m*[x]:{cpu.1}"}


@pytest.mark.parametrize("name", [".", ".."])
def test_dot_segments_are_not_names(name: str) -> None:
    # An HTTP client resolves them away: such a stream could never be reached by URL.
    assert not re.match(NAME_PATTERN, name)
    assert re.match(NAME_PATTERN, name + "x")
    assert re.match(NAME_PATTERN, "...")
