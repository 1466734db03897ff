"""The exponentially weighted spread (variance, std, z) through the HTTP API, against pandas and
a 50-digit computation from the weights themselves (tests/reference.py)."""

import random

import httpx
import pandas as pd
import pytest
import redis

from tests.reference import decay_for, exact_decay_spread, exact_time_spread
from tests.utils import snapshot

pytestmark = pytest.mark.anyio

START = 1.7e9


def values(seed: int, count: int) -> list[float]:
    """Magnitudes 1e-3 .. 1e6, both signs."""
    rng = random.Random(seed)
    return [rng.choice([-1, 1]) * 10 ** rng.uniform(-3, 6) for _ in range(count)]


async def push(client: httpx.AsyncClient, name: str, body: dict[str, object]) -> dict[str, object]:
    response = await client.post(f"/v1/streams/{name}/values", json=body)
    assert response.status_code == 200, response.text
    state: dict[str, object] = response.json()
    return state


async def push_all(
    client: httpx.AsyncClient, name: str, samples: list[object]
) -> dict[str, object]:
    state: dict[str, object] = {}
    for start in range(0, len(samples), 700):
        state = await push(client, name, {"values": samples[start : start + 700]})
    return state


async def history(client: httpx.AsyncClient, name: str) -> list[dict[str, float | None]]:
    page = (await client.get(f"/v1/streams/{name}/history?since=0&limit=10000")).json()
    entries: list[dict[str, float | None]] = page["entries"]
    return entries


def close(a: float | None, b: float | None, rel: float = 1e-12) -> bool:
    if a is None or b is None:
        return a is b
    return a == pytest.approx(b, rel=rel, abs=0)


@pytest.mark.parametrize(("decay", "initial"), [(0.99, None), (0.9, 0.0), (0.999, -5.0)])
async def test_decay_spread_is_pandas_at_every_step(
    client: httpx.AsyncClient, decay: float, initial: float | None
) -> None:
    xs = values(1, 3000)
    config = {"decay": decay, "initial": initial, "history": len(xs)}
    await client.put("/v1/streams/s", json=config)
    state = await push_all(client, "s", list(xs))
    ewm = pd.Series(xs).ewm(alpha=1 - decay, adjust=False)
    mean, var, std = ewm.mean(), ewm.var(), ewm.std()
    entries = await history(client, "s")
    assert entries[0]["std"] is None
    assert entries[0]["z"] is None
    assert entries[1]["z"] is None  # the spread of one value is not defined
    for k in range(1, len(xs)):
        assert close(entries[k]["std"], std[k]), k
        if k >= 2:
            z = (xs[k] - mean[k - 1]) / std[k - 1]
            assert close(entries[k]["z"], z, rel=1e-9), k
    exact = exact_decay_spread(xs, [decay] * len(xs))
    assert close(state["variance"], exact.variance)  # type: ignore[arg-type]
    assert close(state["variance"], var.iloc[-1])  # type: ignore[arg-type]
    assert close(state["std"], exact.std)  # type: ignore[arg-type]
    assert (await client.get("/v1/streams/s")).json() == state


async def test_decay_spread_with_num_updates_uses_the_decay_each_update_used(
    client: httpx.AsyncClient,
) -> None:
    xs = values(2, 2000)
    steps = list(range(len(xs)))
    await client.put("/v1/streams/s", json={"decay": 0.999, "initial": 0})
    decays = [decay_for(0.999, n) for n in steps]
    samples = [{"value": x, "num_updates": n} for x, n in zip(xs, steps, strict=True)]
    start = 0
    for end in [3, 50, 900, 2000]:
        state = await push_all(client, "s", samples[start:end])
        exact = exact_decay_spread(xs[:end], decays[:end])
        assert close(state["variance"], exact.variance), end  # type: ignore[arg-type]
        start = end


@pytest.mark.parametrize("arithmetic", ["tensorflow-float64", "tensorflow-float32"])
async def test_the_spread_is_float64_in_every_arithmetic(
    client: httpx.AsyncClient, arithmetic: str
) -> None:
    xs = values(3, 500)
    await client.put("/v1/streams/a", json={"decay": 0.99})
    await client.put("/v1/streams/b", json={"decay": 0.99, "arithmetic": arithmetic})
    a, b = await push_all(client, "a", list(xs)), await push_all(client, "b", list(xs))
    assert a["value"] != b["value"]
    assert (a["variance"], a["std"], a["z"]) == (b["variance"], b["std"], b["z"])


def irregular_times(seed: int, count: int, halflife: float) -> list[float]:
    rng = random.Random(seed)
    times, t = [], START
    for _ in range(count):
        t += rng.expovariate(1.0) * halflife / 10 if rng.random() < 0.9 else 0.0  # duplicates
        times.append(t)
    return times


@pytest.mark.parametrize("halflife", [10.0, 0.25])
async def test_time_spread_is_exact_and_order_independent(
    client: httpx.AsyncClient, halflife: float
) -> None:
    xs = values(4, 2500)
    ts = irregular_times(5, len(xs), halflife)
    exact = exact_time_spread(xs, ts, halflife)
    samples = [{"value": x, "timestamp": t} for x, t in zip(xs, ts, strict=True)]
    states = []
    for seed in range(3):
        order = samples[:]
        if seed:
            random.Random(seed).shuffle(order)
        await client.put(f"/v1/streams/h{seed}", json={"halflife": halflife})
        states.append(await push_all(client, f"h{seed}", order))
    for state in states:
        assert close(state["value"], exact.mean)  # type: ignore[arg-type]
        assert close(state["variance"], exact.variance)  # type: ignore[arg-type]
        assert close(state["std"], exact.std)  # type: ignore[arg-type]
        assert state["count"] == len(xs)


async def test_time_spread_is_pandas_on_regular_spacing(client: httpx.AsyncClient) -> None:
    halflife, spacing = 30.0, 4.0
    xs = values(6, 1000)
    await client.put("/v1/streams/r", json={"halflife": halflife, "history": len(xs)})
    samples = [{"value": x, "timestamp": START + spacing * i} for i, x in enumerate(xs)]
    await push_all(client, "r", samples)
    ewm = pd.Series(xs).ewm(alpha=1 - 2 ** (-spacing / halflife), adjust=True)
    mean, std = ewm.mean(), ewm.std()
    entries = await history(client, "r")
    for k in range(1, len(xs)):
        assert close(entries[k]["std"], std[k]), k
        if k >= 2:
            assert close(entries[k]["z"], (xs[k] - mean[k - 1]) / std[k - 1], rel=1e-9), k


async def test_z_is_null_without_a_spread_before(client: httpx.AsyncClient) -> None:
    await client.put("/v1/streams/c", json={"decay": 0.9})
    state = await push(client, "c", {"values": [2.0, 2.0, 2.0]})
    assert (state["variance"], state["std"], state["z"]) == (0.0, 0.0, None)
    state = await push(client, "c", {"value": 3.0})
    assert state["z"] is None  # infinitely far from a spread of 0: no finite z-score
    assert state["std"] > 0  # type: ignore[operator]
    state = await push(client, "c", {"value": 2.0})
    ewm = pd.Series([2.0, 2.0, 2.0, 3.0]).ewm(alpha=0.1, adjust=False)
    z = (2.0 - ewm.mean().iloc[-1]) / ewm.std().iloc[-1]
    assert close(state["z"], z, rel=1e-12)  # type: ignore[arg-type]


async def test_rate_streams_have_no_spread(client: httpx.AsyncClient) -> None:
    await client.put("/v1/streams/r", json={"halflife": 60, "kind": "rate"})
    state = await push(client, "r", {"values": [3, 1, 4, 1, 5]})
    assert (state["variance"], state["std"], state["z"]) == (None, None, None)


async def test_a_variance_beyond_float64_is_refused_and_changes_nothing(
    client: httpx.AsyncClient, redis_client: "redis.Redis"
) -> None:
    await client.put("/v1/streams/o", json={"decay": 0.5})
    await push(client, "o", {"value": 1e200})
    before = snapshot(redis_client)
    response = await client.post("/v1/streams/o/values", json={"values": [1.0, -1e200]})
    assert response.status_code == 422
    assert "variance overflows" in response.json()["detail"]
    assert snapshot(redis_client) == before


async def test_a_stream_with_its_spread_stays_a_listpack(
    client: httpx.AsyncClient, redis_client: "redis.Redis"
) -> None:
    # A hash value over 64 bytes (hash-max-listpack-value) turns the hash into a hashtable,
    # about four times the memory: every field, the spread's included, stays under it.
    await client.put("/v1/streams/s", json={"decay": 0.9})
    tiny = [-1.2345678901234567e-150 * (1 + i / 7) for i in range(20)]
    await push(client, "s", {"values": tiny})
    state = await push(client, "s", {"value": -9.876543210987654e-151})
    assert state["z"] is not None
    assert redis_client.object("encoding", "test:{s}") == "listpack"
