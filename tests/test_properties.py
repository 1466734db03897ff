"""Hypothesis: any valid pushes match the reference; anything invalid changes nothing; no name
reaches outside the key prefix."""

import json
import math
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.redis_server import RedisServer
from tests.reference import ReferenceEma
from tests.service import ServiceProcess
from tests.utils import snapshot

RUNS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e150, max_value=1e150)
num_updates = st.none() | st.integers(min_value=0, max_value=10**15)
samples = st.lists(st.tuples(finite, num_updates), min_size=1, max_size=20)
configs = st.fixed_dictionaries(
    {
        "decay": st.floats(min_value=0, max_value=1),
        "initial": st.none() | finite,
        "auto_num_updates": st.booleans(),
    }
)


@pytest.fixture(scope="module")
def http(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[httpx.Client]:
    service = ServiceProcess(
        tmp_path_factory.mktemp("properties"),
        REDIS_URL=redis_server.url,
        EMA_KEY_PREFIX="prop:",
        EMA_WORKERS="1",
        EMA_ACCESS_LOG="false",
    )
    with httpx.Client(base_url=service.url) as client:
        yield client
    service.kill()


@pytest.fixture(scope="module")
def raw(redis_server: RedisServer) -> Iterator["redis.Redis"]:
    with redis_server.client() as client:
        yield client


@RUNS
@given(config=configs, pushes=st.lists(samples, min_size=1, max_size=8))
def test_any_valid_pushes_match_the_reference(
    http: httpx.Client, config: dict[str, Any], pushes: list[list[tuple[float, int | None]]]
) -> None:
    assert http.put("/v1/streams/p", json=config).status_code in (200, 201)
    reference = ReferenceEma(config["decay"], config["initial"], config["auto_num_updates"])
    for batch in pushes:
        body = {"values": [{"value": v, "num_updates": n} for v, n in batch]}
        for value, steps in batch:
            reference.push(value, steps)
        state = http.post("/v1/streams/p/values", json=body).json()
        assert state["value"] == reference.shadow
        assert state["debiased"] == reference.debiased
        assert state["count"] == reference.count


junk = st.one_of(
    st.text(max_size=5),
    st.booleans(),
    st.none(),
    st.just(math.nan),
    st.just(math.inf),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.integers(max_value=-1),
)
invalid_pushes = st.one_of(
    st.fixed_dictionaries({"value": junk.filter(lambda x: not isinstance(x, int | float))}),
    st.fixed_dictionaries({"value": finite, "num_updates": junk}).filter(
        lambda body: body["num_updates"] is not None
    ),
    st.fixed_dictionaries(
        {"values": st.lists(finite, max_size=3).flatmap(lambda ok: st.just([*ok, "x"]))}
    ),
    st.dictionaries(st.sampled_from(["valu", "Value", "v"]), finite, min_size=1),
)


@RUNS
@given(body=invalid_pushes)
def test_any_invalid_push_changes_nothing(
    http: httpx.Client, raw: "redis.Redis", body: dict[str, Any]
) -> None:
    http.put("/v1/streams/p", json={"decay": 0.5, "initial": 1.0})
    before = snapshot(raw)
    response = http.post(
        "/v1/streams/p/values", content=_dumps(body), headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, (body, response.text)
    assert snapshot(raw) == before


def _dumps(body: dict[str, Any]) -> str:
    return json.dumps(body)  # NaN and Infinity written as Python does, on purpose


@RUNS
@given(name=st.text(min_size=1, max_size=40))
def test_no_name_reaches_outside_the_key_prefix(
    http: httpx.Client, raw: "redis.Redis", name: str
) -> None:
    raw.flushdb()
    quoted = quote(name, safe="")  # every character reaches the service, '/' and '%' too
    http.post(f"/v1/streams/{quoted}/values", json={"value": 1.0})
    http.put(f"/v1/streams/{quoted}", json={"decay": 0.5})
    for key in raw.scan_iter(count=1000):
        assert key.startswith("prop:{"), key
        assert key.count("{") == 1
        assert key.count("}") == 1


# --- every number honest: extreme configurations and values never answer 500 ------------------

extreme = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),  # subnormals and 1.7976931348623157e308
    st.sampled_from([5e-324, -5e-324, 2.2250738585072014e-308, 1e-300, 1e300, -1.7e308, 0.0]),
    st.sampled_from([3.4028234663852886e38, 3.5e38, 1.1754943508222875e-38, 1e-45]),
)
extreme_decay = st.one_of(
    st.floats(min_value=0, max_value=1),
    st.sampled_from([0.0, 1.0, 5e-324, 1 - 2**-53, 0.99999999, 0.5]),
)
extreme_halflife = st.one_of(
    st.floats(min_value=1e-6, max_value=1e9),
    st.sampled_from([1e-6, 1e9, 1e-300, 5e-324, 1e-9, 0.0]),
)
extreme_configs = st.one_of(
    st.fixed_dictionaries(
        {
            "decay": extreme_decay,
            "initial": st.none() | extreme,
            "auto_num_updates": st.booleans(),
            "arithmetic": st.sampled_from(["float64", "tensorflow-float64", "tensorflow-float32"]),
        },
        optional={"windows": st.just([{"name": "w", "decay": 0.5}, {"name": "h", "halflife": 1}])},
    ),
    st.fixed_dictionaries(
        {"halflife": extreme_halflife, "kind": st.sampled_from(["mean", "rate"])},
        optional={"windows": st.just([{"name": "h", "halflife": 1e-6}])},
    ),
)
# seconds from now: the past, and up to the default EMA_MAX_CLOCK_SKEW (60 s) ahead
offsets = st.none() | st.floats(min_value=-1e6, max_value=59) | st.sampled_from([-1e9, 0.0, 59.0])
extreme_samples = st.lists(
    st.tuples(extreme, st.none() | st.integers(min_value=0, max_value=10**15), offsets),
    min_size=1,
    max_size=6,
)


def _numbers(body: Any) -> list[float]:
    if isinstance(body, dict):
        return [x for value in body.values() for x in _numbers(value)]
    if isinstance(body, list):
        return [x for value in body for x in _numbers(value)]
    return [float(body)] if isinstance(body, int | float) and not isinstance(body, bool) else []


def _honest(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    text = response.text
    assert "Infinity" not in text, text
    assert "NaN" not in text, text
    state: dict[str, Any] = response.json()
    assert all(math.isfinite(x) for x in _numbers(state)), state
    return state


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(config=extreme_configs, pushes=st.lists(extreme_samples, min_size=1, max_size=5))
def test_extreme_configurations_and_values_never_500_and_a_refusal_applies_nothing(
    http: httpx.Client,
    raw: "redis.Redis",
    config: dict[str, Any],
    pushes: list[list[tuple[float, int | None, float | None]]],
) -> None:
    raw.flushdb()
    put = http.put("/v1/streams/x", json=config)
    assert put.status_code in (201, 422), put.text
    if put.status_code == 422:
        assert raw.dbsize() == 0
        return
    applied = 0
    for batch in pushes:
        now = time.time()
        body = {
            "values": [
                {"value": v, "num_updates": n, "timestamp": None if o is None else max(0, now + o)}
                for v, n, o in batch
            ]
        }
        before = snapshot(raw)
        response = http.post("/v1/streams/x/values", json=body)
        assert response.status_code in (200, 409, 422), response.text
        if response.status_code == 200:
            applied += len(batch)
            state = _honest(response)
            assert state["value"] is not None
        else:
            assert snapshot(raw) == before
        state = _honest(http.get("/v1/streams/x"))
        assert state["count"] == applied
