"""Several service processes on one Redis (or one Redis Cluster) behave as one service: pushes
to the same streams through any of them, concurrently, lose and repeat nothing."""

import asyncio
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from tests.redis_server import RedisCluster, RedisServer
from tests.reference import ReferenceEma
from tests.service import ServiceProcess

STREAMS = ["hot", "warm.a", "warm.b"]
ROUNDS = 8
CLIENTS = 8  # per process


@pytest.mark.parametrize("backend", ["single", "cluster"])
def test_two_processes_pushing_to_the_same_streams_keep_exact_counts(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    server: RedisServer | RedisCluster = request.getfixturevalue(
        "redis_cluster" if backend == "cluster" else "single_redis_server"
    )
    with server.client() as client:
        client.flushall()
    env = {"REDIS_URL": server.url, "EMA_KEY_PREFIX": "test:", "EMA_WORKERS": "2"}
    if backend == "cluster":
        env["REDIS_CLUSTER"] = "true"
    services = [ServiceProcess(tmp_path, **env), ServiceProcess(tmp_path, **env)]
    try:
        counts = asyncio.run(push_through(services))
        # Read while the services run (their workers end with them).
        states = {
            name: httpx.get(f"{services[0].url}/v1/streams/{name}").json() for name in STREAMS
        }
    finally:
        for service in services:
            service.kill()
    # One single push and one bulk entry of two values per stream, per client and round.
    per_stream = len(services) * CLIENTS * ROUNDS * 3
    for name in STREAMS:
        assert sorted(counts[name]) == sorted(set(counts[name])), "two pushes saw one count"
        state = states[name]
        assert state["count"] == per_stream
        reference = ReferenceEma(0.99, None)
        for _ in range(per_stream):
            reference.push(1.0)
        assert state["value"] == reference.shadow


async def push_through(services: list[ServiceProcess]) -> dict[str, list[int]]:
    """Every client pushes to every stream, one value at a time and in bulk; returns the count
    each push reported (a bulk entry of two values reports the second)."""
    counts: dict[str, list[int]] = defaultdict(list)

    async def client(http: httpx.AsyncClient) -> None:
        for _ in range(ROUNDS):
            for name in STREAMS:
                pushed = await http.post(f"/v1/streams/{name}/values", json={"value": 1.0})
                assert pushed.status_code == 200, pushed.text
                counts[name].append(pushed.json()["count"])
            entries = [{"stream": name, "values": [1.0, 1.0]} for name in STREAMS]
            bulk = await http.post("/v1/values", json={"entries": entries})
            assert bulk.status_code == 200, bulk.text
            for result in bulk.json()["results"]:
                assert result["status"] == 200, result
                counts[result["stream"]].append(result["state"]["count"])

    limits = httpx.Limits(max_connections=CLIENTS)
    https = [httpx.AsyncClient(base_url=s.url, limits=limits, timeout=30) for s in services]
    try:
        await asyncio.gather(*(client(http) for http in https for _ in range(CLIENTS)))
    finally:
        for http in https:
            await http.aclose()
    return counts
