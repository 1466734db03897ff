"""POST /v1/values: many streams in one request, each entry applied on its own and reported.

Runs against a single Redis and a Redis Cluster (`pytestmark`); `client` is conftest's, on the
settings below."""

import asyncio
import json

import httpx
import pytest
import redis

from app.auth import ApiKey, hash_key
from app.settings import Settings
from tests.redis_server import RedisServer
from tests.reference import ReferenceEma
from tests.utils import SINGLE_AND_CLUSTER, make_settings, serve, snapshot

# Every test runs on a single Redis and on a Redis Cluster.
pytestmark = [pytest.mark.anyio, SINGLE_AND_CLUSTER]

MAX_BATCH = 50


@pytest.fixture
def settings(redis_server: RedisServer) -> Settings:
    return make_settings(redis_server.url, max_batch=MAX_BATCH)


async def bulk(client: httpx.AsyncClient, *entries: object, **kwargs: object) -> dict[str, object]:
    response = await client.post("/v1/values", json={"entries": list(entries)}, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    reply: dict[str, object] = response.json()
    return reply


async def test_each_entry_is_applied_as_its_own_push_would_be(client: httpx.AsyncClient) -> None:
    await client.put("/v1/streams/v1", json={"decay": 0.99, "initial": 0})
    reply = await bulk(
        client,
        {"stream": "v1", "value": 5, "num_updates": 0},
        {"stream": "cpu", "value": 1.5},
        {"stream": "mem", "values": [2, 3, {"value": 4, "num_updates": 1}]},
        {"stream": "v1", "values": [{"value": 10, "num_updates": 10000}]},
        {"stream": "v1", "value": 10, "num_updates": 10000},
    )
    assert reply["applied"] == 5
    assert reply["failed"] == 0
    results = reply["results"]
    assert isinstance(results, list)
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    assert [r["stream"] for r in results] == ["v1", "cpu", "mem", "v1", "v1"]
    assert all(r["status"] == 200 and r["error"] is None for r in results)
    # Entries of one stream are applied in request order: the founding article's example.
    assert [results[i]["state"]["value"] for i in (0, 3, 4)] == [4.5, 4.555, 4.60945]
    mem = ReferenceEma(0.99, None)
    for value, steps in [(2.0, None), (3.0, None), (4.0, 1)]:
        mem.push(value, steps)
    assert results[2]["state"]["value"] == mem.shadow
    assert results[2]["state"]["count"] == 3
    for name in ("v1", "cpu", "mem"):
        stored = (await client.get(f"/v1/streams/{name}")).json()
        assert stored == [r for r in results if r["stream"] == name][-1]["state"]


BAD_ENTRIES = {
    "nan": {"stream": "b", "value": float("nan")},
    "string value": {"stream": "b", "value": "5"},
    "no value": {"stream": "b"},
    "value and values": {"stream": "b", "value": 1, "values": [2]},
    "num_updates with values": {"stream": "b", "values": [1], "num_updates": 3},
    "bad element": {"stream": "b", "values": [1, "x"]},
    "unknown field": {"stream": "b", "value": 1, "weight": 2},
    "bad stream name": {"stream": "b{c}", "value": 1},
    "no stream": {"value": 1},
    "not an object": 7,
    "bad idempotency key": {"stream": "b", "value": 1, "idempotency_key": "a b"},
}


@pytest.mark.parametrize("entry", BAD_ENTRIES.values(), ids=BAD_ENTRIES.keys())
async def test_an_invalid_entry_fails_alone(
    client: httpx.AsyncClient, redis_client: "redis.Redis", entry: object
) -> None:
    body = {"entries": [{"stream": "a", "value": 1}, entry, {"stream": "c", "value": 2}]}
    content = json.dumps(body).encode()  # NaN as the json module writes it, which is refused
    response = await client.post("/v1/values", content=content)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["applied"] == 2
    assert reply["failed"] == 1
    first, bad, last = reply["results"]
    assert (first["status"], last["status"]) == (200, 200)
    assert bad["status"] == 422
    assert bad["state"] is None
    assert bad["error"]["status"] == 422
    assert bad["error"]["title"] == "Unprocessable Entity"
    assert bad["error"]["detail"]
    expected_stream = entry.get("stream") if isinstance(entry, dict) else None
    assert bad["stream"] == expected_stream
    assert sorted(redis_client.keys("*")) == ["test:{a}", "test:{c}"]


async def test_a_push_refused_by_the_script_fails_alone(
    client: httpx.AsyncClient, redis_client: "redis.Redis"
) -> None:
    await client.post("/v1/streams/big/values", json={"value": 1e308})
    before = snapshot(redis_client)
    reply = await bulk(client, {"stream": "big", "value": -1e308}, {"stream": "ok", "value": 1})
    overflow, ok = reply["results"]  # type: ignore[misc]
    assert overflow["status"] == 422
    assert "overflows" in overflow["error"]["detail"]
    assert ok["status"] == 200
    after = snapshot(redis_client)
    assert after["test:{big}"] == before["test:{big}"]


async def test_too_many_values_in_all_is_422_and_changes_nothing(
    client: httpx.AsyncClient, redis_client: "redis.Redis"
) -> None:
    entries = [{"stream": f"s{i}", "values": [1.0] * 10} for i in range(MAX_BATCH // 10 + 1)]
    response = await client.post("/v1/values", json={"entries": entries})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert f"at most {MAX_BATCH}" in response.json()["detail"]
    assert redis_client.keys("*") == []


@pytest.mark.parametrize("body", [b"{}", b'{"entries": []}', b'{"entries": 3}', b"[", b""])
async def test_a_bad_envelope_is_422(
    client: httpx.AsyncClient, redis_client: "redis.Redis", body: bytes
) -> None:
    response = await client.post("/v1/values", content=body)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert redis_client.keys("*") == []


async def test_an_oversized_body_is_413(
    redis_server: RedisServer, redis_client: "redis.Redis"
) -> None:
    async for client in serve(make_settings(redis_server.url, max_body_bytes=4096)):
        entries = [{"stream": f"s{i}", "value": 1.0} for i in range(200)]
        response = await client.post("/v1/values", json={"entries": entries})
        assert response.status_code == 413
    assert redis_client.keys("*") == []


async def test_missing_stream_is_404_per_entry_when_auto_create_is_off(
    redis_server: RedisServer, redis_client: "redis.Redis"
) -> None:
    async for client in serve(make_settings(redis_server.url, auto_create=False)):
        await client.put("/v1/streams/there", json={"decay": 0.5})
        reply = await bulk(
            client, {"stream": "missing", "value": 1}, {"stream": "there", "value": 1}
        )
        missing, there = reply["results"]  # type: ignore[misc]
        assert missing["status"] == 404
        assert missing["error"]["detail"] == "stream 'missing' does not exist"
        assert there["status"] == 200
    assert sorted(redis_client.keys("*")) == ["test:{there}"]


async def test_idempotency_keys_per_entry(client: httpx.AsyncClient) -> None:
    entries = [
        {"stream": "a", "value": 1, "idempotency_key": "k1"},
        {"stream": "b", "value": 2, "idempotency_key": "k1"},  # keys are per stream
    ]
    first = await bulk(client, *entries)
    assert first["applied"] == 2
    retry = await bulk(client, *entries, {"stream": "a", "value": 9, "idempotency_key": "k1"})
    assert retry["applied"] == 0
    assert [r["replayed"] for r in retry["results"][:2]] == [True, True]  # type: ignore[index]
    assert [r["state"] for r in retry["results"][:2]] == [  # type: ignore[index]
        r["state"]
        for r in first["results"]  # type: ignore[union-attr]
    ]
    mismatch = retry["results"][2]  # type: ignore[index]
    assert mismatch["status"] == 422
    assert "Idempotency-Key" in mismatch["error"]["detail"]
    assert (await client.get("/v1/streams/a")).json()["count"] == 1


async def test_the_script_is_loaded_again_after_a_script_flush(
    client: httpx.AsyncClient, redis_client: "redis.Redis"
) -> None:
    await bulk(client, {"stream": "a", "value": 1})
    redis_client.script_flush()
    reply = await bulk(client, *({"stream": f"s{i}", "value": i} for i in range(20)))
    assert reply["applied"] == 20
    assert len(redis_client.keys("*")) == 21


async def test_concurrent_bulk_pushes_lose_no_update(client: httpx.AsyncClient) -> None:
    names = [f"hot{i}" for i in range(5)]

    async def pusher() -> None:
        for _ in range(10):
            await bulk(client, *({"stream": name, "values": [1.0, 1.0]} for name in names))

    await asyncio.gather(*(pusher() for _ in range(10)))
    for name in names:
        assert (await client.get(f"/v1/streams/{name}")).json()["count"] == 200


async def test_the_schema_documents_the_entries(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    post = schema["paths"]["/v1/values"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/BulkPush"
    }
    entries = schema["components"]["schemas"]["BulkPush"]["properties"]["entries"]
    assert entries["items"] == {"$ref": "#/components/schemas/BulkEntry"}
    entry = schema["components"]["schemas"]["BulkEntry"]
    assert {"stream", "value", "values", "idempotency_key"} <= set(entry["properties"])
    assert "stream" in entry["required"]
    for model in ("BulkReply", "BulkResult"):
        for field, spec in schema["components"]["schemas"][model]["properties"].items():
            assert spec.get("description"), (model, field)


# --- API keys -----------------------------------------------------------------------------------

KEYS = [
    ApiKey(
        name="cpu-writer", sha256=hash_key("cpu"), scopes=frozenset({"write"}), prefixes=("cpu.",)
    ),
    ApiKey(name="reader", sha256=hash_key("read"), scopes=frozenset({"read"})),
]


async def test_each_entry_needs_a_key_that_may_write_its_stream(
    redis_server: RedisServer, redis_client: "redis.Redis"
) -> None:
    async for client in serve(make_settings(redis_server.url, api_keys=KEYS)):
        entries = {"entries": [{"stream": "cpu.a", "value": 1}, {"stream": "mem.a", "value": 1}]}
        assert (await client.post("/v1/values", json=entries)).status_code == 401
        read = await client.post(
            "/v1/values", json=entries, headers={"Authorization": "Bearer read"}
        )
        assert read.status_code == 403
        reply = await bulk(client, *entries["entries"], headers={"Authorization": "Bearer cpu"})
        allowed, refused = reply["results"]  # type: ignore[misc]
        assert allowed["status"] == 200
        assert refused["status"] == 403
        assert "cpu-writer" in refused["error"]["detail"]
    assert redis_client.keys("*") == ["test:{cpu.a}"]
