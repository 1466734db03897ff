"""`python -m app`, the README's run command, as a real process: embedded Redis, several
workers, the worked example over real HTTP, and a clean stop."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.redis_server import free_port
from tests.service import ServiceProcess, service_env
from tests.utils import RUN_MARK, processes_marked


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ServiceProcess]:
    with ServiceProcess(tmp_path, EMA_WORKERS="2") as running:
        yield running


def test_run_command_serves_the_worked_example(service: ServiceProcess) -> None:
    base = service.url
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


def test_workers_share_one_redis_and_lose_no_update(service: ServiceProcess) -> None:
    base = service.url

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
    service: ServiceProcess, tmp_path: Path
) -> None:
    process = service.process
    with httpx.Client(base_url=service.url) as http:
        assert http.post("/v1/streams/kept/values", json={"value": 1.5}).status_code == 200
    logged = service.log.read_text()
    redis_port = int(re.search(r"embedded redis-server on redis://127.0.0.1:(\d+)", logged)[1])
    assert port_open(redis_port)

    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0
    assert not port_open(redis_port)
    assert (tmp_path / "data" / "appendonlydir").is_dir()

    with ServiceProcess(tmp_path, EMA_WORKERS="2") as again:
        state = httpx.get(f"{again.url}/v1/streams/kept").json()
        assert (state["count"], state["value"]) == (1, 1.5)


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


def group_members(pgid: int) -> set[int]:
    """The live (not zombie) processes of a process group, from /proc."""
    members = set()
    for entry in Path("/proc").iterdir():
        try:
            # Fields after the command's closing parenthesis: state, ppid, pgrp, ...
            state, _, pgrp = (entry / "stat").read_text().rpartition(")")[2].split()[:3]
        except (OSError, ValueError):  # not a process, or ended meanwhile
            continue
        if int(pgrp) == pgid and state != "Z":
            members.add(int(entry.name))
    return members


def test_killing_the_service_ends_its_workers_and_embedded_redis(tmp_path: Path) -> None:
    service = ServiceProcess(tmp_path, EMA_WORKERS="2")
    try:
        # The supervisor, two workers, the embedded redis-server (and uvicorn's helpers).
        assert len(group_members(service.process.pid)) >= 4
    finally:
        service.kill()
    deadline = time.monotonic() + 5
    while group_members(service.process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group_members(service.process.pid)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{service.url}/healthz")


def test_a_process_left_running_is_found_by_the_end_of_run_check() -> None:
    # A shell that leaves `sleep` running behind it: an orphan, no longer below this process.
    orphan = subprocess.run(
        ["sh", "-c", "sleep 60 > /dev/null 2>&1 & echo $!"], capture_output=True, text=True
    )
    pid = int(orphan.stdout)
    try:
        assert pid in {found for found, _ in processes_marked(os.environ[RUN_MARK])}
    finally:
        os.kill(pid, signal.SIGKILL)
