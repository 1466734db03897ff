"""Time-aware streams: halflife means as pandas computes them, exact late samples, several
windows, rates that decay while a source is silent, idle expiry."""

import asyncio
import math
import random
import time

import httpx
import pandas as pd
import pytest
import redis

from tests.reference import ReferenceEma
from tests.utils import snapshot

pytestmark = pytest.mark.anyio

# Timestamps below are BASE + k/8 s: exact in float64 and in ns. BASE is small because pandas
# turns int64 nanoseconds into float64 before taking differences, which near 1.7e18 ns (today)
# rounds each to 256 ns and alone costs it ~1e-8 in relative accuracy.
BASE = 1000.0


def irregular_times(rng: random.Random, count: int, halflife: float) -> list[float]:
    """Gaps of about 2.5 half-lives on average, some repeated timestamps; all multiples of 1/8 s."""
    times, t = [], BASE
    for _ in range(count):
        if rng.random() > 0.05:
            t += round(rng.expovariate(1 / (2.5 * halflife)) * 8) / 8
        times.append(t)
    return times


def pandas_mean(values: list[float], times: list[float], halflife: float) -> float:
    # Exact nanoseconds (times are multiples of 1/8 s): float ns near 1.7e18 would round to 256.
    index = pd.to_datetime([round(t * 8) * 125_000_000 for t in times], unit="ns")
    series = pd.Series(values)
    mean = series.ewm(halflife=pd.Timedelta(seconds=halflife), times=index).mean()
    return float(mean.iloc[-1])


def direct_mean(values: list[float], times: list[float], halflife: float) -> float:
    """The weighted mean with each weight computed on its own, summed exactly (fsum)."""
    newest = max(times)
    weights = [2 ** ((t - newest) / halflife) for t in times]
    return math.fsum(x * w for x, w in zip(values, weights, strict=True)) / math.fsum(weights)


async def push_all(
    client: httpx.AsyncClient, name: str, values: list[float], times: list[float], chunk: int = 50
) -> dict[str, object]:
    state: dict[str, object] = {}
    for start in range(0, len(values), chunk):
        body = {
            "values": [
                {"value": v, "timestamp": t}
                for v, t in zip(
                    values[start : start + chunk], times[start : start + chunk], strict=True
                )
            ]
        }
        response = await client.post(f"/v1/streams/{name}/values", json=body)
        assert response.status_code == 200, response.text
        state = response.json()
    return state


async def test_halflife_mean_matches_pandas_over_thousands_of_half_lives(
    client: httpx.AsyncClient,
) -> None:
    rng = random.Random(3)
    halflife = 10.0
    times = irregular_times(rng, 2000, halflife)
    # Positive values: a mean near zero would make any relative comparison ill-conditioned.
    values = [rng.uniform(1, 100) for _ in times]
    assert (times[-1] - times[0]) / halflife > 3000
    await client.put("/v1/streams/t", json={"halflife": halflife})
    state = await push_all(client, "t", values, times)
    assert state["value"] == pytest.approx(pandas_mean(values, times, halflife), rel=1e-12)
    assert state["value"] == pytest.approx(direct_mean(values, times, halflife), rel=1e-14)
    assert state["timestamp"] == times[-1]
    assert state["count"] == 2000
    assert state["debiased"] == state["value"]


async def test_mixed_signs_match_the_direct_sum(client: httpx.AsyncClient) -> None:
    # pandas accumulates its decay step by step and drifts by ~1e-10 here; the epoch-relative
    # sums stay within a few ulps of each weight computed on its own.
    rng = random.Random(3)
    times = irregular_times(rng, 2000, 10.0)
    values = [rng.uniform(-100, 100) for _ in times]
    await client.put("/v1/streams/t", json={"halflife": 10.0})
    state = await push_all(client, "t", values, times)
    assert state["value"] == pytest.approx(direct_mean(values, times, 10.0), rel=1e-13)


async def test_shuffled_and_late_samples_give_the_same_mean(client: httpx.AsyncClient) -> None:
    rng = random.Random(5)
    halflife = 30.0
    times = irregular_times(rng, 600, halflife)
    values = [rng.uniform(0, 1e6) for _ in times]
    order = list(range(len(times)))
    rng.shuffle(order)
    await client.put("/v1/streams/inorder", json={"halflife": halflife})
    await client.put("/v1/streams/shuffled", json={"halflife": halflife})
    in_order = await push_all(client, "inorder", values, times)
    shuffled = await push_all(
        client, "shuffled", [values[i] for i in order], [times[i] for i in order], chunk=7
    )
    expected = pandas_mean(values, times, halflife)
    assert in_order["value"] == pytest.approx(expected, rel=1e-12)
    assert shuffled["value"] == pytest.approx(expected, rel=1e-12)
    assert shuffled["timestamp"] == max(times)


async def test_duplicate_timestamps_each_weigh_one(client: httpx.AsyncClient) -> None:
    await client.put("/v1/streams/d", json={"halflife": 5.0})
    state = await push_all(client, "d", [1.0, 2.0, 6.0], [BASE, BASE, BASE])
    assert state["value"] == pytest.approx(3.0, rel=1e-15)
    state = await push_all(client, "d", [10.0], [BASE + 5.0])
    # The three earlier samples now weigh 1/2 each, the new one 1.
    assert state["value"] == pytest.approx((0.5 * 9.0 + 10.0) / (1.5 + 1.0), rel=1e-15)


async def test_fixed_decay_matches_pandas_adjust_false(client: httpx.AsyncClient) -> None:
    rng = random.Random(11)
    values = [rng.gauss(50, 20) for _ in range(3000)]
    alpha = 0.05
    await client.put("/v1/streams/f", json={"decay": 1 - alpha})
    state = await push_all(client, "f", values, [BASE] * len(values), chunk=300)
    expected = pd.Series(values).ewm(alpha=alpha, adjust=False).mean().iloc[-1]
    assert state["value"] == pytest.approx(float(expected), rel=1e-12)


async def test_several_windows_are_updated_by_one_push(client: httpx.AsyncClient) -> None:
    rng = random.Random(13)
    config = {
        "halflife": 10.0,
        "windows": [
            {"name": "1m", "halflife": 60},
            {"name": "5m", "halflife": 300},
            {"name": "fast", "decay": 0.9},
        ],
    }
    assert (await client.put("/v1/streams/w", json=config)).status_code == 201
    times = irregular_times(rng, 400, 20.0)
    values = [rng.uniform(0, 10) for _ in times]
    state = await push_all(client, "w", values, times)
    windows = state["windows"]
    assert isinstance(windows, dict)
    assert state["value"] == pytest.approx(pandas_mean(values, times, 10.0), rel=1e-12)
    for name, halflife in (("1m", 60.0), ("5m", 300.0)):
        assert windows[name]["value"] == pytest.approx(
            pandas_mean(values, times, halflife), rel=1e-12
        )
        assert windows[name]["halflife"] == halflife
    fast = ReferenceEma(0.9)
    for value in values:
        fast.push(value)
    assert windows["fast"]["value"] == fast.shadow


def reference_rate(events: list[tuple[float, float]], halflife: float, now: float) -> float:
    return sum(c * math.log(2) / halflife * 2 ** (-(now - t) / halflife) for t, c in events)


async def test_rate_stream_reports_events_per_second_decaying_while_silent(
    client: httpx.AsyncClient,
) -> None:
    halflife = 1.0
    await client.put("/v1/streams/r", json={"halflife": halflife, "kind": "rate"})
    start = time.time() - 20
    events = [(start + i * 0.5, float(1 + i % 3)) for i in range(40)]
    state = await push_all(client, "r", [c for _, c in events], [t for t, _ in events])
    pushed_at = state["updated_at"]
    assert isinstance(pushed_at, float)
    assert state["value"] == pytest.approx(reference_rate(events, halflife, pushed_at), rel=1e-9)
    before = time.time()
    await asyncio.sleep(1.0)
    later = (await client.get("/v1/streams/r")).json()["value"]
    after = time.time()
    # Silent for at least a halflife: the rate has at least halved, as the reference says.
    assert reference_rate(events, halflife, after + 0.5) <= later
    assert later <= reference_rate(events, halflife, before - 0.5)
    assert later < state["value"] / 2 * 1.3


async def test_steady_events_give_their_rate(client: httpx.AsyncClient) -> None:
    await client.put("/v1/streams/steady", json={"halflife": 2.0, "kind": "rate"})
    now = time.time()
    # 5 events every 0.25 s for 60 s (30 half-lives), the last one now: 20 events per second.
    times = [now - 60 + k / 4 for k in range(241)]
    state = await push_all(client, "steady", [5.0] * len(times), times)
    # A sum of discrete events swings around the continuous rate between events: within 10 %.
    assert state["value"] == pytest.approx(20.0, rel=0.1)


async def test_late_samples_can_be_rejected(
    client: httpx.AsyncClient, redis_client: "redis.Redis"
) -> None:
    await client.put("/v1/streams/strict", json={"halflife": 5.0, "late": "reject"})
    await push_all(client, "strict", [1.0], [BASE + 10])
    before = snapshot(redis_client)
    response = await client.post(
        "/v1/streams/strict/values",
        json={
            "values": [
                {"value": 2.0, "timestamp": BASE + 11},
                {"value": 3.0, "timestamp": BASE + 9},
            ]
        },
    )
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert "older than the newest" in response.json()["detail"]
    assert snapshot(redis_client) == before
    equal = await client.post(
        "/v1/streams/strict/values", json={"value": 4.0, "timestamp": BASE + 10}
    )
    assert equal.status_code == 200


async def test_idle_streams_expire(client: httpx.AsyncClient, redis_client: "redis.Redis") -> None:
    await client.put("/v1/streams/idle", json={"decay": 0.5, "ttl": 100, "history": 5})
    assert 0 < redis_client.ttl("test:{idle}") <= 100
    redis_client.expire("test:{idle}", 10)
    await client.post("/v1/streams/idle/values", json={"value": 1.0})
    assert 90 < redis_client.ttl("test:{idle}") <= 100
    assert 90 < redis_client.ttl("test:{idle}:history") <= 100
    redis_client.pexpire("test:{idle}", 1)
    await asyncio.sleep(0.05)
    assert (await client.get("/v1/streams/idle")).status_code == 404


BAD_CONFIGS = {
    "zero halflife": {"halflife": 0},
    "negative halflife": {"halflife": -5},
    "decay and halflife": {"decay": 0.5, "halflife": 5},
    "rate without halflife": {"decay": 0.5, "kind": "rate"},
    "initial with halflife": {"halflife": 5, "initial": 1.0},
    "empty windows": {"halflife": 5, "windows": []},
    "too many windows": {
        "halflife": 5,
        "windows": [{"name": f"w{i}", "halflife": 1} for i in range(9)],
    },
    "duplicate window names": {
        "halflife": 5,
        "windows": [{"name": "a", "halflife": 1}, {"name": "a", "decay": 0.5}],
    },
    "window without decay or halflife": {"halflife": 5, "windows": [{"name": "a"}]},
    "bad window name": {"halflife": 5, "windows": [{"name": "a:b", "halflife": 1}]},
    "zero ttl": {"decay": 0.5, "ttl": 0},
}


@pytest.mark.parametrize("config", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
async def test_bad_time_config_is_422(
    client: httpx.AsyncClient, redis_client: "redis.Redis", config: dict[str, object]
) -> None:
    before = snapshot(redis_client)
    response = await client.put("/v1/streams/x", json=config)
    assert response.status_code == 422, response.text
    assert snapshot(redis_client) == before


@pytest.mark.parametrize(
    "timestamp",
    [b"NaN", b"Infinity", b"-1", b'"2026-01-01"', b"1e300", str(time.time() + 7200).encode()],
)
async def test_bad_timestamps_are_422(
    client: httpx.AsyncClient, redis_client: "redis.Redis", timestamp: bytes
) -> None:
    await client.put("/v1/streams/t", json={"halflife": 5.0})
    await client.post("/v1/streams/t/values", json={"value": 1.0})
    before = snapshot(redis_client)
    for body in (
        b'{"value": 2, "timestamp": ' + timestamp + b"}",
        b'{"values": [3, {"value": 2, "timestamp": ' + timestamp + b"}]}",
    ):
        response = await client.post("/v1/streams/t/values", content=body)
        assert response.status_code == 422, response.text
    assert snapshot(redis_client) == before


async def test_a_rate_ahead_of_the_clock_is_reported_as_of_its_newest_sample(
    client: httpx.AsyncClient,
) -> None:
    # Within EMA_MAX_CLOCK_SKEW (60 s by default): 2 ** ((newest - now) / halflife) would be
    # 2 ** 50 here and 2 ** 1500 with a larger skew (an OverflowError, answered 500).
    await client.put("/v1/streams/r", json={"halflife": 1, "kind": "rate"})
    response = await client.post(
        "/v1/streams/r/values", json={"value": 3, "timestamp": time.time() + 50}
    )
    assert response.status_code == 200, response.text
    assert response.json()["value"] == 3 * math.log(2)
    state = (await client.get("/v1/streams/r")).json()
    assert state["value"] == 3 * math.log(2)


@pytest.mark.parametrize("halflife", [5e-324, 1e-300, 1e-9, 0.0])
async def test_a_halflife_below_a_microsecond_is_refused(
    client: httpx.AsyncClient, halflife: float
) -> None:
    for config in [
        {"halflife": halflife, "kind": "rate"},
        {"decay": 0.5, "windows": [{"name": "w", "halflife": halflife}]},
    ]:
        response = await client.put("/v1/streams/r", json=config)
        assert response.status_code == 422, response.text
    assert (await client.get("/v1/streams/r")).status_code == 404


async def test_an_overflowing_rate_is_refused_not_null(
    client: httpx.AsyncClient, redis_client: "redis.Redis"
) -> None:
    await client.put("/v1/streams/r", json={"halflife": 1e-6, "kind": "rate"})
    ok = await client.post("/v1/streams/r/values", json={"value": 1e300})
    assert ok.json()["value"] == 1e300 * math.log(2) / 1e-6
    before = snapshot(redis_client)
    response = await client.post("/v1/streams/r/values", json={"values": [1.0, 1e303]})
    assert response.status_code == 422
    assert "rate overflows" in response.json()["detail"]
    assert snapshot(redis_client) == before
