"""The arithmetic modes through the HTTP API: every step of every vector real TensorFlow computed
(tests/vectors/tensorflow.json), bit for bit, read back from the stream's history."""

import math
import random
import struct

import httpx
import numpy as np
import pytest
import redis

from app.scripts import load_source
from tests.reference import ARITHMETICS, ReferenceEma, to_float32
from tests.vectors.load import Vector, vectors

pytestmark = pytest.mark.anyio

WORKED = [(5.0, 0), (10.0, 10000), (10.0, 10000)]


async def push(client: httpx.AsyncClient, name: str, body: dict[str, object]) -> dict[str, object]:
    response = await client.post(f"/v1/streams/{name}/values", json=body)
    assert response.status_code == 200, response.text
    state: dict[str, object] = response.json()
    return state


@pytest.mark.parametrize(
    ("arithmetic", "shadows", "decay_used"),
    [
        ("float64", [4.5, 4.555, 4.60945], 0.99),
        (
            "tensorflow-float64",
            [4.4999998807907104, 4.554999829530715, 4.609449779307839],
            0.9900000095367432,
        ),
        ("tensorflow-float32", [4.5, 4.554999828338623, 4.609449863433838], 0.9900000095367432),
    ],
)
async def test_worked_example_in_each_arithmetic(
    client: httpx.AsyncClient, arithmetic: str, shadows: list[float], decay_used: float
) -> None:
    put = await client.put(
        "/v1/streams/v1", json={"decay": 0.99, "initial": 0, "arithmetic": arithmetic}
    )
    assert put.status_code == 201, put.text
    assert put.json()["config"]["arithmetic"] == arithmetic
    got = [(await push(client, "v1", {"value": v, "num_updates": n}))["value"] for v, n in WORKED]
    assert got == shadows
    state = (await client.get("/v1/streams/v1")).json()
    assert state["decay_used"] == decay_used
    assert state["config"]["arithmetic"] == arithmetic


async def read_history(client: httpx.AsyncClient, name: str) -> list[dict[str, float]]:
    entries: list[dict[str, float]] = []
    since: int | None = 0
    while since is not None:
        page = (await client.get(f"/v1/streams/{name}/history?since={since}&limit=10000")).json()
        entries += page["entries"]
        since = page["next_since"]
    return entries


@pytest.mark.parametrize("vector", vectors(), ids=lambda v: v.name)
async def test_every_tensorflow_vector_bit_for_bit(
    client: httpx.AsyncClient, vector: Vector
) -> None:
    config = {
        "decay": vector.decay,
        "initial": vector.initial,
        "arithmetic": vector.arithmetic,
        "history": len(vector.values),
    }
    assert (await client.put("/v1/streams/tf", json=config)).status_code == 201
    samples = [
        {"value": v, "num_updates": n}
        for v, n in zip(vector.values, vector.num_updates, strict=True)
    ]
    for start in range(0, len(samples), 500):
        await push(client, "tf", {"values": samples[start : start + 500]})
    got = [entry["value"] for entry in await read_history(client, "tf")]
    assert len(got) == len(vector.shadows)
    mismatches = [
        (i, g, s)
        for i, (g, s) in enumerate(zip(got, vector.shadows, strict=True))
        if g.hex() != s.hex()
    ]
    assert mismatches == []
    assert (await client.get("/v1/streams/tf")).json()["value"] == vector.shadows[-1]


@pytest.mark.parametrize("arithmetic", ARITHMETICS)
async def test_debiased_and_windows_follow_the_arithmetic(
    client: httpx.AsyncClient, arithmetic: str
) -> None:
    await client.put(
        "/v1/streams/s",
        json={
            "decay": 0.999,
            "arithmetic": arithmetic,
            "auto_num_updates": True,
            "windows": [{"name": "fast", "decay": 0.9}],
        },
    )
    main = ReferenceEma(0.999, auto_num_updates=True, arithmetic=arithmetic)  # type: ignore[arg-type]
    # windows take the same num_updates (here the count) as the main value
    fast = ReferenceEma(0.9, auto_num_updates=True, arithmetic=arithmetic)  # type: ignore[arg-type]
    values = [3.25, -1e-3, 1234567.891, 0.1, 2.0**-130, 77.0] * 20
    for value in values:
        main.push(value)
        fast.push(value)
    state = await push(client, "s", {"values": values})
    assert state["value"] == main.shadow
    assert state["debiased"] == main.debiased
    assert state["decay_used"] == main.decay_used
    assert state["windows"]["fast"]["value"] == fast.shadow  # type: ignore[index]


async def test_a_float32_stream_refuses_values_beyond_float32(client: httpx.AsyncClient) -> None:
    await client.put("/v1/streams/f", json={"decay": 0.9, "arithmetic": "tensorflow-float32"})
    await push(client, "f", {"value": 3.4e38})
    refused = await client.post("/v1/streams/f/values", json={"values": [1.0, 3.5e38]})
    assert refused.status_code == 422
    assert "float32" in refused.json()["detail"]
    state = (await client.get("/v1/streams/f")).json()
    assert state["count"] == 1
    assert state["value"] == to_float32(3.4e38) != 3.4e38


@pytest.mark.parametrize(
    "config",
    [
        {"halflife": 10, "arithmetic": "tensorflow-float64"},
        {"decay": 0.9, "arithmetic": "tensorflow-float32", "initial": 1e39},
        {"decay": 0.9, "arithmetic": "float16"},
    ],
)
async def test_arithmetic_configurations_refused(
    client: httpx.AsyncClient, config: dict[str, object]
) -> None:
    response = await client.put("/v1/streams/bad", json=config)
    assert response.status_code == 422, response.text
    assert (await client.get("/v1/streams/bad")).status_code == 404


def test_the_scripts_float32_rounding_is_numpys(redis_client: "redis.Redis") -> None:
    """push.lua's float32() (cut out of the script) on ties, subnormals, signed zeros and the
    overflow boundary, against numpy's conversion."""
    source = load_source("push")
    function = source[source.index("local frexp, ldexp") : source.index("-- TensorFlow's CPU")]
    harness = function + (
        "local out = {} for i = 1, #ARGV do local y = float32(tonumber(ARGV[i])) "
        "if y == math.huge then out[i] = 'inf' elseif y == -math.huge then out[i] = '-inf' "
        "elseif y == 0 and 1 / y < 0 then out[i] = '-0' else out[i] = string.format('%.17g', y) "
        "end end return out"
    )
    rng = random.Random(32)
    xs: list[float] = [0.0, -0.0, 5e-324, -1e-300, 1e-45, 7e-46, 7.006492321624085e-46,
                       1.1754942106924411e-38, 1.1754943508222875e-38, 3.4028234663852886e38,
                       3.4028235677973366e38, 3.402823567797336e38, -1e39, 1e300]  # fmt: skip
    for _ in range(6000):
        f = float(np.float32(rng.uniform(-1, 1) * 10 ** rng.uniform(-45, 38.5)))
        step = 2.0 ** max(math.frexp(f)[1] - 24, -149)
        xs.append(f + step / 2 * rng.choice([1, -1, 0.999999, 1.000001, 0.0]))  # ties, near
        xs.append(struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0])
    xs = [x for x in xs if math.isfinite(x)]
    got = redis_client.eval(harness, 0, *[repr(x) for x in xs])  # type: ignore[no-untyped-call]
    with np.errstate(over="ignore"):
        expected = [np.float32(x) for x in xs]
    for x, g, e in zip(xs, got, expected, strict=True):
        if math.isinf(e):
            assert g == ("inf" if e > 0 else "-inf"), x
        elif e == 0 and np.signbit(e):
            assert g == "-0", x
        else:
            assert float(g) == float(e), x
