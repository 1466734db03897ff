"""Every kind of bad input: a clear 4xx problem, and stored state exactly as it was."""

from collections.abc import AsyncIterator

import httpx
import pytest
import redis

from app.settings import Settings
from tests.redis_server import RedisServer
from tests.utils import SINGLE_AND_CLUSTER, make_settings, serve, snapshot

# Every test runs on a single Redis and on a Redis Cluster.
pytestmark = [pytest.mark.anyio, SINGLE_AND_CLUSTER]

MAX_BATCH = 50
MAX_BODY = 4096


@pytest.fixture(params=[True, False], ids=["fast-path", "framework"])
def settings(request: pytest.FixtureRequest, redis_server: RedisServer) -> Settings:
    return make_settings(
        redis_server.url, fast_path=request.param, max_batch=MAX_BATCH, max_body_bytes=MAX_BODY
    )


@pytest.fixture
async def client(
    settings: Settings, redis_client: "redis.Redis"
) -> AsyncIterator[httpx.AsyncClient]:
    async for http in serve(settings):
        await http.put("/v1/streams/cpu", json={"decay": 0.9, "initial": 1.0})
        await http.post("/v1/streams/cpu/values", json={"value": 2.0})
        yield http


BAD_PUSHES = {
    "nan": b'{"value": NaN}',
    "infinity": b'{"value": Infinity}',
    "minus-infinity": b'{"value": -Infinity}',
    "overflowing literal": b'{"value": 1e400}',
    "huge integer": b'{"value": 1' + b"0" * 400 + b"}",
    "string": b'{"value": "5"}',
    "boolean": b'{"value": true}',
    "null": b'{"value": null}',
    "no value": b"{}",
    "value and values": b'{"value": 1, "values": [2]}',
    "empty values": b'{"values": []}',
    "values not a list": b'{"values": 3}',
    "bad element": b'{"values": [1, 2, "x"]}',
    "nan element": b'{"values": [1, NaN]}',
    "bad element num_updates": b'{"values": [1, {"value": 2, "num_updates": -1}]}',
    "num_updates with values": b'{"values": [1], "num_updates": 3}',
    "negative num_updates": b'{"value": 1, "num_updates": -1}',
    "fractional num_updates": b'{"value": 1, "num_updates": 1.5}',
    "float num_updates": b'{"value": 1, "num_updates": 7.5e0}',
    "string num_updates": b'{"value": 1, "num_updates": "7"}',
    "too large num_updates": b'{"value": 1, "num_updates": 1000000000000001}',
    "unknown field": b'{"value": 1, "weight": 2}',
    "not json": b"value=5",
    "truncated json": b'{"value": 1',
    "array body": b"[1, 2]",
    "empty body": b"",
    "batch over the limit": b'{"values": [' + b", ".join([b"1"] * (MAX_BATCH + 1)) + b"]}",
}


@pytest.mark.parametrize("body", BAD_PUSHES.values(), ids=BAD_PUSHES.keys())
async def test_bad_push_is_422_and_changes_nothing(
    client: httpx.AsyncClient, redis_client: "redis.Redis", body: bytes
) -> None:
    before = snapshot(redis_client)
    for name in ("cpu", "fresh"):
        response = await client.post(f"/v1/streams/{name}/values", content=body)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["status"] == 422
        assert problem["detail"]
    assert snapshot(redis_client) == before


async def test_integral_floats_are_integers(client: httpx.AsyncClient) -> None:
    # JSON Schema's "integer" admits 7.0, and so does the API.
    put = await client.put("/v1/streams/i", json={"decay": 0.99, "history": 10.0})
    assert put.json()["config"]["history"] == 10
    state = (
        await client.post("/v1/streams/i/values", json={"value": 1, "num_updates": 7.0})
    ).json()
    assert state["decay_used"] == (1 + 7) / (10 + 7)


async def test_overflowing_update_is_422_and_changes_nothing(
    client: httpx.AsyncClient, redis_client: "redis.Redis"
) -> None:
    await client.post("/v1/streams/big/values", json={"value": 1.7e308})
    before = snapshot(redis_client)
    response = await client.post("/v1/streams/big/values", json={"values": [1.0, -1.7e308]})
    assert response.status_code == 422
    assert "overflow" in response.json()["detail"]
    assert snapshot(redis_client) == before


BAD_CONFIGS = {
    "negative decay": b'{"decay": -0.1}',
    "decay over one": b'{"decay": 1.5}',
    "string decay": b'{"decay": "0.9"}',
    "nan decay": b'{"decay": NaN}',
    "missing decay": b'{"initial": 0}',
    "nan initial": b'{"decay": 0.5, "initial": NaN}',
    "infinite initial": b'{"decay": 0.5, "initial": -Infinity}',
    "string auto": b'{"decay": 0.5, "auto_num_updates": "yes"}',
    "unknown field": b'{"decay": 0.5, "halflife": 3}',
    "not json": b"decay=0.5",
}


@pytest.mark.parametrize("body", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
async def test_bad_config_is_422_and_changes_nothing(
    client: httpx.AsyncClient, redis_client: "redis.Redis", body: bytes
) -> None:
    before = snapshot(redis_client)
    for name in ("cpu", "fresh"):
        response = await client.put(f"/v1/streams/{name}", content=body)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"
    assert snapshot(redis_client) == before


# %2E is `.`, sent encoded: an HTTP client would resolve a bare `.` or `..` segment itself.
BAD_NAMES = [
    *("a{b", "a}b", "{cpu}", "a b", "a*", "ä", "a/b", "x" * 201, "a%00b", "a%7Bb"),
    *("%2E", "%2E%2E", "%2e%2E"),
]


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_bad_stream_name_is_rejected_everywhere(
    client: httpx.AsyncClient, redis_client: "redis.Redis", name: str
) -> None:
    before = snapshot(redis_client)
    path = f"/v1/streams/{name}"
    responses = [
        await client.put(path, json={"decay": 0.5}),
        await client.get(path),
        await client.delete(path),
        await client.post(f"{path}/values", json={"value": 1}),
    ]
    for response in responses:
        # 422 for a name outside the alphabet; 404 when a '/' makes it no route at all.
        assert response.status_code in (404, 422), (name, response.status_code)
        assert response.headers["content-type"] == "application/problem+json"
    assert snapshot(redis_client) == before


def oversized_body(declared: bool) -> bytes | AsyncIterator[bytes]:
    """Over MAX_BODY, with its length declared up front, or streamed in chunks."""
    if declared:
        return b'{"values": [' + b", ".join([b"1.5"] * 2000) + b"]}"

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"values": ['
        for _ in range(2000):
            yield b"1.5, "
        yield b"1]}"

    return chunks()


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "streamed"])
async def test_oversized_body_is_413(
    client: httpx.AsyncClient, redis_client: "redis.Redis", declared: bool
) -> None:
    before = snapshot(redis_client)
    assert 2000 * len(b"1.5, ") > MAX_BODY
    for method, path in (("POST", "/v1/streams/cpu/values"), ("PUT", "/v1/streams/cpu")):
        response = await client.request(method, path, content=oversized_body(declared))
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/problem+json"
        assert str(MAX_BODY) in response.json()["detail"]
    assert snapshot(redis_client) == before


@pytest.mark.parametrize("name", [".", ".."])
async def test_dot_names_are_refused(
    client: httpx.AsyncClient, redis_client: "redis.Redis", name: str
) -> None:
    # Reachable by no ordinary HTTP client (they remove dot segments), so never created.
    before = snapshot(redis_client)
    encoded = name.replace(".", "%2E")
    for method, path, body in (
        ("PUT", f"/v1/streams/{encoded}", {"decay": 0.5}),
        ("POST", f"/v1/streams/{encoded}/values", {"value": 1}),
    ):
        response = await client.request(method, path, json=body)
        assert response.status_code == 422, (method, response.text)
    bulk = await client.post("/v1/values", json={"entries": [{"stream": name, "value": 1}]})
    assert bulk.json()["results"][0]["status"] == 422
    assert snapshot(redis_client) == before


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/v1/streams/deep"), ("POST", "/v1/streams/deep/values"), ("POST", "/v1/values")],
)
async def test_deeply_nested_json_is_422(
    redis_server: RedisServer,
    redis_client: "redis.Redis",
    settings: Settings,
    method: str,
    path: str,
) -> None:
    # Beyond the JSON parsers' nesting limits: malformed input like any other, as the README says.
    async for http in serve(make_settings(redis_server.url, fast_path=settings.fast_path)):
        response = await http.request(method, path, content=b"[" * 100_000)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == 422
    assert snapshot(redis_client) == {}
