"""Faults survived with nothing lost: Redis killed under load, a stop during a slow request."""

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.redis_server import RedisServer
from tests.service import ServiceProcess

PUSHERS = 6


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(
        tmp_path / "redis",
        "--appendonly", "yes",
        "--appendfsync", "always",
        "--enable-debug-command", "yes",
    ).start()  # fmt: skip
    yield server
    server.kill()


def test_acknowledged_pushes_survive_redis_sigkill_under_load(
    tmp_path: Path, durable_redis: RedisServer
) -> None:
    service = ServiceProcess(
        tmp_path, REDIS_URL=durable_redis.url, EMA_WORKERS="2", EMA_REDIS_TIMEOUT="0.5"
    )
    acked: dict[str, list[int]] = {f"s{i}": [] for i in range(PUSHERS)}
    statuses: list[int] = []
    stop = threading.Event()

    def pusher(name: str) -> None:
        with httpx.Client(base_url=service.url, timeout=5) as http:
            while not stop.is_set():
                response = http.post(f"/v1/streams/{name}/values", json={"value": 1.0})
                statuses.append(response.status_code)
                if response.status_code == 200:
                    acked[name].append(response.json()["count"])
                else:
                    assert response.status_code == 503, response.text
                    assert response.headers["retry-after"]
                    time.sleep(0.05)

    threads = [threading.Thread(target=pusher, args=(name,)) for name in acked]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        durable_redis.kill()
        time.sleep(0.7)
        durable_redis.start()
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        service.kill()
    assert 503 in statuses, "the outage was not seen"
    assert statuses[-1] == 200, "the service did not recover"
    with redis.Redis(port=durable_redis.port, decode_responses=True) as client:
        for name, counts in acked.items():
            final = int(client.hget(f"ema:{{{name}}}", "n") or 0)
            # Each acknowledged push's count is at most the count Redis kept: none was lost.
            assert counts, name
            assert max(counts) <= final, (name, max(counts), final)
            assert counts == sorted(counts)
            assert len(set(counts)) == len(counts)


def test_sigterm_finishes_the_request_in_flight(tmp_path: Path, durable_redis: RedisServer) -> None:
    service = ServiceProcess(
        tmp_path, REDIS_URL=durable_redis.url, EMA_WORKERS="1", EMA_REDIS_TIMEOUT="5"
    )
    result: list[httpx.Response] = []
    try:
        httpx.post(f"{service.url}/v1/streams/s/values", json={"value": 1.0})

        def slow_redis() -> None:
            with redis.Redis(port=durable_redis.port) as client:
                client.execute_command("DEBUG", "SLEEP", "1")

        blocker = threading.Thread(target=slow_redis)
        blocker.start()
        time.sleep(0.2)
        in_flight = threading.Thread(
            target=lambda: result.append(
                httpx.post(f"{service.url}/v1/streams/s/values", json={"value": 3.0}, timeout=10)
            )
        )
        in_flight.start()
        time.sleep(0.2)
        service.process.send_signal(signal.SIGTERM)
        in_flight.join()
        blocker.join()
        assert service.process.wait(10) == 0
    finally:
        service.kill()
    assert result[0].status_code == 200
    assert result[0].json()["count"] == 2
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{service.url}/healthz")
