"""The EMA arithmetic through the HTTP API, against the founding article and the reference."""

import random

import httpx
import pytest

from tests.reference import ReferenceEma
from tests.utils import SINGLE_AND_CLUSTER

# Every test runs on a single Redis and on a Redis Cluster.
pytestmark = [pytest.mark.anyio, SINGLE_AND_CLUSTER]


async def push(client: httpx.AsyncClient, name: str, body: dict[str, object]) -> dict[str, object]:
    response = await client.post(f"/v1/streams/{name}/values", json=body)
    assert response.status_code == 200, response.text
    state: dict[str, object] = response.json()
    return state


async def test_founding_article_worked_example(client: httpx.AsyncClient) -> None:
    # tf-ema-article.txt: v1 = 0, ExponentialMovingAverage(0.99, step); the article prints the
    # float32 values 4.5, 4.5549998, 4.6094499; in float64 they are exactly these.
    put = await client.put("/v1/streams/v1", json={"decay": 0.99, "initial": 0})
    assert put.status_code == 201
    assert put.json()["value"] == 0.0
    assert (await push(client, "v1", {"value": 5, "num_updates": 0}))["value"] == 4.5
    assert (await push(client, "v1", {"value": 10, "num_updates": 10000}))["value"] == 4.555
    state = await push(client, "v1", {"value": 10, "num_updates": 10000})
    assert state["value"] == 4.60945
    assert state["decay_used"] == 0.99
    assert state["count"] == 3
    assert state["last"] == 10.0
    assert (await client.get("/v1/streams/v1")).json() == state


async def test_tensorflow_form_differs_from_textbook_form_in_the_last_bit(
    client: httpx.AsyncClient,
) -> None:
    await client.put("/v1/streams/v1", json={"decay": 0.99, "initial": 0})
    await push(client, "v1", {"values": [{"value": 5, "num_updates": 0}, 10]})
    state = await push(client, "v1", {"value": 10})
    textbook = 0.99 * (0.99 * 4.5 + 0.01 * 10) + 0.01 * 10
    assert state["value"] == 4.60945
    assert textbook != 4.60945


async def test_first_value_seeds_a_stream_without_initial(client: httpx.AsyncClient) -> None:
    await client.put("/v1/streams/s", json={"decay": 0.9})
    fresh = (await client.get("/v1/streams/s")).json()
    assert fresh["value"] is None
    assert fresh["debiased"] is None
    assert fresh["count"] == 0
    assert (await push(client, "s", {"value": 7.25}))["value"] == 7.25
    state = await push(client, "s", {"value": 8.25})
    assert state["value"] == 7.25 - (1 - 0.9) * (7.25 - 8.25)


async def test_auto_num_updates_uses_the_streams_own_count(client: httpx.AsyncClient) -> None:
    await client.put("/v1/streams/s", json={"decay": 0.99, "initial": 0, "auto_num_updates": True})
    reference = ReferenceEma(0.99, 0.0, auto_num_updates=True)
    for value in [5.0, 10.0, 10.0, -3.0]:
        reference.push(value)
        state = await push(client, "s", {"value": value})
        assert state["value"] == reference.shadow
        assert state["decay_used"] == reference.decay_used
    # An explicit num_updates still wins over the count.
    reference.push(1.0, 20000)
    assert (await push(client, "s", {"value": 1.0, "num_updates": 20000}))["value"] == (
        reference.shadow
    )


async def test_debiased_value_is_not_dragged_toward_zero(client: httpx.AsyncClient) -> None:
    await client.put("/v1/streams/s", json={"decay": 0.999, "initial": 0})
    state = await push(client, "s", {"values": [3.0, 3.0, 3.0]})
    assert state["value"] < 0.01
    assert state["debiased"] == pytest.approx(3.0, rel=1e-12)


@pytest.mark.parametrize("decay", [0.0, 1.0])
async def test_decay_bounds(client: httpx.AsyncClient, decay: float) -> None:
    await client.put("/v1/streams/s", json={"decay": decay, "initial": 2.0})
    state = await push(client, "s", {"values": [5.0, 6.0]})
    assert state["value"] == (6.0 if decay == 0.0 else 2.0)
    # With every decay 1 nothing was learned: there is no bias-corrected value to give.
    assert state["debiased"] == (6.0 if decay == 0.0 else None)


def random_samples(rng: random.Random, count: int) -> list[tuple[float, int | None]]:
    samples: list[tuple[float, int | None]] = []
    for _ in range(count):
        # Up to 1e150: the spread's variance of values 1e154 apart would overflow float64 (such
        # a push is refused, tests/test_spread.py).
        magnitude = 10.0 ** rng.uniform(-300, 150) if rng.random() < 0.2 else rng.uniform(0, 1e3)
        value = rng.choice([-1.0, 1.0]) * magnitude
        num_updates = rng.choice([None, None, rng.randrange(0, 50), rng.randrange(0, 10**15)])
        samples.append((value, num_updates))
    return samples


@pytest.mark.parametrize("initial", [None, 0.0, -123.456])
async def test_long_random_sequence_is_bit_identical_to_the_reference(
    client: httpx.AsyncClient, initial: float | None
) -> None:
    rng = random.Random(f"ema-{initial}")
    decay = rng.choice([0.5, 0.9, 0.99, 0.999, 0.9999, rng.random()])
    await client.put("/v1/streams/r", json={"decay": decay, "initial": initial})
    reference = ReferenceEma(decay, initial)
    samples = random_samples(rng, 3000)
    position = 0
    while position < len(samples):
        size = rng.choice([1, 1, 2, 7, 50, 300])
        chunk = samples[position : position + size]
        position += size
        for value, num_updates in chunk:
            reference.push(value, num_updates)
        if len(chunk) == 1:
            ((value, num_updates),) = chunk
            body: dict[str, object] = {"value": value, "num_updates": num_updates}
        else:
            body = {"values": [{"value": v, "num_updates": n} for v, n in chunk]}
        state = await push(client, "r", body)
        # == on floats: bit-identical (no NaN can occur here).
        assert state["value"] == reference.shadow
        assert state["debiased"] == reference.debiased
        assert state["decay_used"] == reference.decay_used
        assert state["last"] == reference.last
    assert state["count"] == reference.count == 3000
