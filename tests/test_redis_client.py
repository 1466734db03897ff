"""The Redis client the service builds: hiredis packing says exactly what redis-py would."""

import pytest
from redis.asyncio import Connection

from app.main import HiredisPackedConnection


@pytest.mark.parametrize(
    "args",
    [
        ("EVALSHA", "a" * 40, 2, "ema:{cpu}", "ema:{cpu}:history", "1", "", "1.5", "ünï"),
        ("SCRIPT LOAD", "return 1"),
        ("HSET", b"k", bytearray(b"f"), "v", 7),
        ("SET", "k", memoryview(b"bytes")),
        ("HSET", "k", "f", 0.1, "g", 1e300, "h", -0.0),
        ("EVALSHA", "a" * 40, 2, "k", "h", *["1.25", "", ""] * 1000),
    ],
)
def test_hiredis_packing_matches_redis_py(args: tuple[object, ...]) -> None:
    ours = b"".join(HiredisPackedConnection().pack_command(*args))  # type: ignore[arg-type]
    theirs = b"".join(Connection().pack_command(*args))  # type: ignore[arg-type]
    assert ours == theirs
