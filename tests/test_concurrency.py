"""Concurrent pushes to one stream lose no update: the Lua script is the only writer."""

import asyncio

import httpx
import pytest

from tests.reference import ReferenceEma
from tests.utils import SINGLE_AND_CLUSTER

# Every test runs on a single Redis and on a Redis Cluster.
pytestmark = [pytest.mark.anyio, SINGLE_AND_CLUSTER]

CLIENTS = 40
PUSHES = 25


async def test_concurrent_pushes_lose_no_update(client: httpx.AsyncClient) -> None:
    await client.put("/v1/streams/hot", json={"decay": 0.5, "initial": 0})

    async def pusher(worker: int) -> list[int]:
        counts = []
        for i in range(PUSHES):
            body = {"value": 1.0} if i % 2 else {"values": [1.0, 1.0]}
            response = await client.post("/v1/streams/hot/values", json=body)
            assert response.status_code == 200
            counts.append(response.json()["count"])
        return counts

    results = await asyncio.gather(*(pusher(worker) for worker in range(CLIENTS)))
    per_client = PUSHES // 2 + 2 * (PUSHES - PUSHES // 2)
    state = (await client.get("/v1/streams/hot")).json()
    assert state["count"] == CLIENTS * per_client
    # Every push saw a distinct count: no two updates read the same state.
    seen = [count for counts in results for count in counts]
    assert len(set(seen)) == len(seen)
    # All values were 1: whatever the interleaving, the shadow is the reference's.
    reference = ReferenceEma(0.5, 0.0)
    for _ in range(CLIENTS * per_client):
        reference.push(1.0)
    assert state["value"] == reference.shadow
