"""Redis going away under a running service: 503 problems while it is gone, and recovery by
itself when it is back, with no restart of the service."""

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.redis_server import RedisCluster, RedisServer
from tests.utils import make_settings, serve

pytestmark = pytest.mark.anyio


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(
        tmp_path, "--appendonly", "yes", "--appendfsync", "always", "--enable-debug-command", "yes"
    ).start()
    yield server
    server.kill()


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "1"
    assert response.json()["status"] == 503


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "framework"])
@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_outage_gives_503_and_the_service_recovers(
    own_redis: RedisServer, fast_path: bool, how: str
) -> None:
    settings = make_settings(own_redis.url, fast_path=fast_path, redis_timeout=0.5)
    async for client in serve(settings):
        await client.put("/v1/streams/cpu", json={"decay": 0.5, "initial": 0})
        assert (await client.post("/v1/streams/cpu/values", json={"value": 4})).status_code == 200

        getattr(own_redis, how)()
        for _ in range(2):  # the pooled connection's failure, then a fresh connect's
            assert_unavailable(await client.post("/v1/streams/cpu/values", json={"value": 8}))
            assert_unavailable(await client.get("/v1/streams/cpu"))
            assert_unavailable(await client.get("/v1/streams"))
            assert_unavailable(await client.put("/v1/streams/x", json={"decay": 0.5}))
            assert_unavailable(await client.get("/readyz"))
        assert (await client.get("/healthz")).status_code == 200

        own_redis.start()
        # AOF with fsync always: the acknowledged push survived even SIGKILL.
        state = (await client.get("/v1/streams/cpu")).json()
        assert (state["count"], state["value"]) == (1, 2.0)
        pushed = await client.post("/v1/streams/cpu/values", json={"value": 8})
        assert pushed.status_code == 200
        assert pushed.json()["value"] == 5.0
        assert (await client.get("/readyz")).status_code == 200


async def test_blocked_redis_gives_503_after_the_timeout(own_redis: RedisServer) -> None:
    # The timeout leaves room for the first push (it also loads the script) on a busy machine.
    settings = make_settings(own_redis.url, redis_timeout=0.8)
    async for client in serve(settings):
        assert (await client.post("/v1/streams/cpu/values", json={"value": 1})).status_code == 200

        def block() -> None:
            with redis.Redis(port=own_redis.port) as blocker:
                blocker.execute_command("DEBUG", "SLEEP", "3")

        blocker = threading.Thread(target=block)
        blocker.start()
        await asyncio.sleep(0.2)
        try:
            response = await client.get("/v1/streams/cpu")
            assert_unavailable(response)
            assert "TimeoutError" in response.json()["detail"]
        finally:
            blocker.join()
        assert (await client.get("/v1/streams/cpu")).status_code == 200


async def burst(client: httpx.AsyncClient) -> set[int]:
    """300 pushes at once, over 10 streams: the statuses they got."""
    pushes = [client.post(f"/v1/streams/s{i % 10}/values", json={"value": 1}) for i in range(300)]
    return {response.status_code for response in await asyncio.gather(*pushes)}


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_first_burst_after_a_restart_gets_no_503(own_redis: RedisServer, how: str) -> None:
    # Every pooled connection is dead after a restart; none of the burst's commands reached
    # Redis on one, so none may fail as "may or may not have been applied".
    settings = make_settings(own_redis.url, redis_timeout=2)
    async for client in serve(settings):
        assert await burst(client) == {200}  # a pool of many connections
        # In a thread, so that the service's event loop runs meanwhile, as it would.
        await asyncio.to_thread(lambda: (getattr(own_redis, how)(), own_redis.start()))
        assert await burst(client) == {200}
        counts = [(await client.get(f"/v1/streams/s{i}")).json()["count"] for i in range(10)]
        assert counts == [60] * 10  # AOF with fsync always: nothing lost, nothing twice


async def test_first_burst_after_a_cluster_restart_gets_no_503(tmp_path: Path) -> None:
    # The cluster client has no check of its own when it hands out a pooled connection.
    cluster = RedisCluster(tmp_path).start()
    try:
        settings = make_settings(cluster.url, redis_cluster=True, redis_timeout=2)

        def restart() -> None:
            for node in cluster.nodes:
                node.kill()
            for node in cluster.nodes:
                node.start()
            cluster.wait_healthy()

        async for client in serve(settings):
            assert await burst(client) == {200}
            await asyncio.to_thread(restart)
            assert await burst(client) == {200}
    finally:
        cluster.stop()
