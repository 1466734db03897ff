"""A stream's bounded recent history, appended by the push script."""

import httpx
import pytest
import redis

from tests.reference import ReferenceEma

pytestmark = pytest.mark.anyio


async def test_history_is_capped_and_consistent_with_the_pushes(
    client: httpx.AsyncClient, redis_client: "redis.Redis"
) -> None:
    await client.put("/v1/streams/h", json={"decay": 0.9, "initial": 0, "history": 50})
    reference = ReferenceEma(0.9, 0.0)
    shadows = []
    for start in range(0, 120, 12):
        values = [float(v % 7) for v in range(start, start + 12)]
        for value in values:
            reference.push(value)
            shadows.append(reference.shadow)
        await client.post("/v1/streams/h/values", json={"values": values})
    # Trimmed by whole nodes of the Redis Stream (at most 100 entries each), read exactly.
    assert 50 <= redis_client.xlen("test:{h}:history") <= 50 + 100
    page = (await client.get("/v1/streams/h/history", params={"limit": 30})).json()
    entries = page["entries"]
    assert [e["id"] for e in entries] == list(range(71, 101))
    assert [e["raw"] for e in entries] == [float(v % 7) for v in range(70, 100)]
    assert [e["value"] for e in entries] == shadows[70:100]
    assert page["next_since"] == 100
    rest = (await client.get("/v1/streams/h/history", params={"since": 100})).json()
    assert [e["id"] for e in rest["entries"]] == list(range(101, 121))
    assert rest["next_since"] is None
    state = (await client.get("/v1/streams/h")).json()
    assert rest["entries"][-1]["time"] == state["updated_at"]


async def test_a_long_history_keeps_its_cap_and_its_memory_bounded(
    client: httpx.AsyncClient, redis_client: "redis.Redis"
) -> None:
    await client.put("/v1/streams/h", json={"decay": 0.5, "history": 30})
    for start in range(0, 1000, 100):
        await client.post("/v1/streams/h/values", json={"values": list(range(start, start + 100))})
        for single in range(3):
            await client.post("/v1/streams/h/values", json={"value": -single})
    count = 1000 + 30
    ids = [e["id"] for e in (await client.get("/v1/streams/h/history")).json()["entries"]]
    assert ids == list(range(count - 29, count + 1))
    since = count - 5
    page = (await client.get("/v1/streams/h/history", params={"since": since})).json()
    assert [e["id"] for e in page["entries"]] == list(range(since + 1, count + 1))
    assert redis_client.xlen("test:{h}:history") <= 30 + 100


async def test_history_is_off_by_default_and_reset_by_put(
    client: httpx.AsyncClient, redis_client: "redis.Redis"
) -> None:
    await client.post("/v1/streams/h/values", json={"value": 1.0})
    assert (await client.get("/v1/streams/h/history")).json()["entries"] == []
    await client.put("/v1/streams/h", json={"decay": 0.5, "history": 10})
    await client.post("/v1/streams/h/values", json={"values": [1.0, 2.0]})
    await client.put("/v1/streams/h", json={"decay": 0.5, "history": 10})
    assert not redis_client.exists("test:{h}:history")
    await client.post("/v1/streams/h/values", json={"value": 3.0})
    entries = (await client.get("/v1/streams/h/history")).json()["entries"]
    assert [(e["id"], e["raw"]) for e in entries] == [(1, 3.0)]
    await client.delete("/v1/streams/h")
    assert redis_client.keys("*") == []


async def test_history_of_unknown_stream_is_404(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v1/streams/nope/history")).status_code == 404
