"""The embedded redis-server: AOF data in its folder, restarted if it dies, a clear message
when redis-server is missing."""

import os
import signal
import time
from pathlib import Path

import pytest
import redis

from app.embedded import EmbeddedRedis, EmbeddedRedisError


def wait_for_ping(url: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with redis.Redis.from_url(url) as client:
                client.ping()
                return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_embedded_redis_keeps_data_across_restarts(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path / "data")
    with redis.Redis.from_url(first.start()) as client:
        client.set("k", "v")
    first.stop()
    assert (tmp_path / "data" / "appendonlydir").is_dir()
    second = EmbeddedRedis(tmp_path / "data")
    try:
        with redis.Redis.from_url(second.start(), decode_responses=True) as client:
            assert client.get("k") == "v"
            assert client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        second.stop()


def test_embedded_redis_is_restarted_when_it_dies(tmp_path: Path) -> None:
    embedded = EmbeddedRedis(tmp_path)
    url = embedded.start()
    try:
        with redis.Redis.from_url(url) as client:
            pid = int(client.info("server")["process_id"])
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        wait_for_ping(url)
        with redis.Redis.from_url(url) as client:
            assert int(client.info("server")["process_id"]) != pid
    finally:
        embedded.stop()


def test_missing_redis_server_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EmbeddedRedisError, match="apt-get install redis-server"):
        EmbeddedRedis(tmp_path).start()
