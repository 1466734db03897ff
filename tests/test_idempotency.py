"""Idempotency-Key: a retried push is applied once, in the same script call that checks it."""

import asyncio

import httpx
import pytest
import redis

from tests.utils import snapshot

pytestmark = pytest.mark.anyio


async def test_retry_with_the_same_key_is_not_applied_again(
    client: httpx.AsyncClient, redis_client: "redis.Redis"
) -> None:
    headers = {"Idempotency-Key": "push-1"}
    first = await client.post("/v1/streams/s/values", json={"value": 4.0}, headers=headers)
    assert first.status_code == 200
    assert "idempotent-replayed" not in first.headers
    await client.post("/v1/streams/s/values", json={"value": 100.0})
    retry = await client.post("/v1/streams/s/values", json={"value": 4.0}, headers=headers)
    assert retry.status_code == 200
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json() == first.json()
    assert (await client.get("/v1/streams/s")).json()["count"] == 2
    ttl = redis_client.ttl("test:{s}:idem:push-1")
    assert 0 < ttl <= 86_400


async def test_same_key_with_a_different_body_is_422(
    client: httpx.AsyncClient, redis_client: "redis.Redis"
) -> None:
    headers = {"Idempotency-Key": "k"}
    await client.post("/v1/streams/s/values", json={"value": 4.0}, headers=headers)
    before = snapshot(redis_client)
    other = await client.post("/v1/streams/s/values", json={"value": 5.0}, headers=headers)
    assert other.status_code == 422
    assert "Idempotency-Key" in other.json()["detail"]
    assert snapshot(redis_client) == before
    # The same push written differently is the same push.
    same = await client.post("/v1/streams/s/values", json={"values": [4]}, headers=headers)
    assert same.headers["idempotent-replayed"] == "true"


async def test_keys_are_per_stream(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "k"}
    for name in ("a", "b"):
        response = await client.post(
            f"/v1/streams/{name}/values", json={"value": 1.0}, headers=headers
        )
        assert "idempotent-replayed" not in response.headers


@pytest.mark.parametrize("key", ["", "a b", "x" * 256, "ключ"])
async def test_bad_idempotency_key_is_422(
    client: httpx.AsyncClient, redis_client: "redis.Redis", key: str
) -> None:
    response = await client.post(
        "/v1/streams/s/values", json={"value": 1.0}, headers={"Idempotency-Key": key.encode()}
    )
    assert response.status_code == 422
    assert redis_client.keys("*") == []


async def test_concurrent_retries_apply_exactly_once(client: httpx.AsyncClient) -> None:
    async def attempt(key: str) -> httpx.Response:
        return await client.post(
            "/v1/streams/s/values", json={"values": [1.0, 2.0]}, headers={"Idempotency-Key": key}
        )

    responses = await asyncio.gather(*(attempt(f"key-{i % 5}") for i in range(100)))
    assert all(response.status_code == 200 for response in responses)
    assert (await client.get("/v1/streams/s")).json()["count"] == 5 * 2
    fresh = [r for r in responses if "idempotent-replayed" not in r.headers]
    assert len(fresh) == 5
