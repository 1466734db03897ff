"""Several service processes on one Redis (or one Redis Cluster) behave as one service: pushes
to the same streams through any of them, concurrently, lose and repeat nothing."""

import asyncio
from collections import defaultdict
from pathlib import Path

import httpx

from tests.redis_server import RedisCluster, RedisServer
from tests.reference import ReferenceEma
from tests.service import ServiceProcess
from tests.utils import SINGLE_AND_CLUSTER

STREAMS = ["hot", "warm.a", "warm.b"]
ROUNDS = 8
CLIENTS = 8  # per process


@SINGLE_AND_CLUSTER
def test_two_processes_pushing_to_the_same_streams_keep_exact_counts(
    tmp_path: Path, redis_server: RedisServer | RedisCluster
) -> None:
    with redis_server.client() as client:
        client.flushall()
    env = {"REDIS_URL": redis_server.url, "EMA_KEY_PREFIX": "test:", "EMA_WORKERS": "2"}
    if isinstance(redis_server, RedisCluster):
        env["REDIS_CLUSTER"] = "true"
    with ServiceProcess(tmp_path, **env) as first, ServiceProcess(tmp_path, **env) as second:
        counts = asyncio.run(push_through([first, second]))
        states = {name: httpx.get(f"{first.url}/v1/streams/{name}").json() for name in STREAMS}
    # One single push and one bulk entry of two values per stream, per client and round.
    per_stream = 2 * CLIENTS * ROUNDS * 3
    for name in STREAMS:
        assert sorted(counts[name]) == sorted(set(counts[name])), "two pushes saw one count"
        assert states[name]["count"] == per_stream
        reference = ReferenceEma(0.99, None)
        for _ in range(per_stream):
            reference.push(1.0)
        assert states[name]["value"] == reference.shadow


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
