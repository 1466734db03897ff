"""`python -m app`, the README's run command, as a real process: embedded Redis, several
workers, the worked example over real HTTP, and a clean stop."""

import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.redis_server import free_port
from tests.service import service_env, wait_ready


def start_service(tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    with (tmp_path / "service.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app"],
            env=service_env(tmp_path, port, EMA_WORKERS="2"),
            stdout=log,
            stderr=log,
        )
    wait_ready(f"http://127.0.0.1:{port}", process)
    return process


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    process = start_service(tmp_path, port)
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_run_command_serves_the_worked_example(
    service: tuple[str, subprocess.Popen[bytes]],
) -> None:
    base, _ = service
    form = {"content-type": "application/x-www-form-urlencoded"}  # what curl -d sends
    with httpx.Client(base_url=base, headers=form) as http:
        assert (
            http.put("/v1/streams/cpu", content='{"decay": 0.99, "initial": 0}').status_code == 201
        )
        values = [
            http.post("/v1/streams/cpu/values", content=body).json()["value"]
            for body in (
                '{"value": 5, "num_updates": 0}',
                '{"value": 10, "num_updates": 10000}',
                '{"value": 10, "num_updates": 10000}',
            )
        ]
        assert values == [4.5, 4.555, 4.60945]
        assert http.get("/v1/streams/cpu").json()["value"] == 4.60945


def test_workers_share_one_redis_and_lose_no_update(
    service: tuple[str, subprocess.Popen[bytes]],
) -> None:
    base, _ = service

    def pushes(_: int) -> set[int]:
        with httpx.Client(base_url=base) as http:
            return {
                http.post("/v1/streams/hot/values", json={"value": 1.0}).json()["count"]
                for _ in range(50)
            }

    with ThreadPoolExecutor(8) as pool:
        counts = [count for seen in pool.map(pushes, range(8)) for count in seen]
    assert sorted(counts) == list(range(1, 401))


def test_sigterm_stops_the_service_and_its_redis_and_data_survives(
    service: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    base, process = service
    with httpx.Client(base_url=base) as http:
        assert http.post("/v1/streams/kept/values", json={"value": 1.5}).status_code == 200
    logged = (tmp_path / "service.log").read_text()
    redis_port = int(re.search(r"embedded redis-server on redis://127.0.0.1:(\d+)", logged)[1])
    assert port_open(redis_port)

    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0
    assert not port_open(redis_port)
    assert (tmp_path / "data" / "appendonlydir").is_dir()

    port = free_port()
    again = start_service(tmp_path, port)
    try:
        state = httpx.get(f"http://127.0.0.1:{port}/v1/streams/kept").json()
        assert (state["count"], state["value"]) == (1, 1.5)
    finally:
        again.terminate()
        again.wait(20)


def test_missing_redis_server_is_explained(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app"],
        env=service_env(tmp_path, free_port(), PATH=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "redis-server was not found" in result.stderr
    assert "REDIS_URL" in result.stderr


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_help_prints_usage_and_starts_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "--help"],
        env=service_env(tmp_path, free_port()),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m app")
    assert "REDIS_URL" in result.stdout
    assert list(tmp_path.iterdir()) == []  # no data folder, no redis-server
