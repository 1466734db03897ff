"""No process outlives its parent: `kill -9` of the supervisor (`python -m app`, or uvicorn with
workers) ends its workers and the embedded redis-server within a second; and one embedded
redis-server per data folder, whatever starts the app. And while the app serves, what it holds
from its start is kept out of the garbage collector's scans."""

import gc
import os
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.redis_server import RedisServer, free_port
from tests.service import ServiceProcess
from tests.utils import make_settings, running

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux prctl")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = text[text.rindex(")") + 2 :].split()[:2]
    return state, int(ppid)


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")  # a zombie has ended


def descendants(root: int) -> dict[int, str]:
    """Every living process below `root`, with its command line."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) and alive(int(entry.name)):
            children.setdefault(stat[1], []).append(int(entry.name))
    found: dict[int, str] = {}
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            try:
                found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            stack.append(child)
    return {pid: command.decode(errors="replace") for pid, command in found.items()}


def redis_servers(processes: dict[int, str]) -> list[int]:
    # A process that is exiting has an empty command line: not a server any more.
    return [pid for pid, command in processes.items() if "redis-server" in command.split(" ")[0]]


def serves(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def assert_all_end_within_a_second(port: int, pids: list[int]) -> None:
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and (serves(port) or any(map(alive, pids))):
        time.sleep(0.02)
    assert not serves(port)
    assert not [pid for pid in pids if alive(pid)]


def push_count(base: str, pushes: int) -> int:
    for _ in range(pushes):  # a new connection each: the workers share them out
        assert httpx.post(f"{base}/v1/streams/n/values", json={"value": 1}).status_code == 200
    return int(httpx.get(f"{base}/v1/streams/n").json()["count"])


def test_kill_9_of_python_m_app_ends_its_workers_and_redis(tmp_path: Path) -> None:
    # Its own process group, ended by the helper: here only the supervisor is killed.
    with ServiceProcess(tmp_path, EMA_WORKERS="2") as service:
        supervisor = service.process
        below = descendants(supervisor.pid)
        assert len(redis_servers(below)) == 1
        assert len(below) >= 3  # two workers and the redis-server, at least
        supervisor.kill()
        supervisor.wait()
        assert_all_end_within_a_second(service.port, list(below))


def test_uvicorn_workers_share_one_embedded_redis_and_end_with_uvicorn(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "--workers", "3", "--port", str(port)]
    with ServiceProcess(
        tmp_path, command=[*command, "app.main:app"], port=port, EMA_WORKERS="2"
    ) as service:
        supervisor, base = service.process, service.url
        deadline = time.monotonic() + 30
        while len(descendants(supervisor.pid)) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)  # the readiness above needed one worker up, not all three
        below = descendants(supervisor.pid)
        [server] = redis_servers(below)  # one, not one per worker
        assert push_count(base, 30) == 30

        # The worker that owns it dies: the server goes with it and another worker starts it
        # again, on the same port and data, while the supervisor replaces the dead worker.
        time.sleep(1.2)  # the AOF is written every second
        owner = _stat(server)
        assert owner is not None
        os.kill(owner[1], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            servers = redis_servers(descendants(supervisor.pid))
            if servers and servers != [server]:
                break
            time.sleep(0.1)
        assert len(servers) == 1
        assert servers != [server]
        service.wait_ready()
        assert push_count(base, 30) == 60

        below = descendants(supervisor.pid)
        supervisor.kill()
        supervisor.wait()
        assert_all_end_within_a_second(service.port, list(below))


@pytest.mark.anyio
async def test_the_started_app_is_out_of_the_collectors_scans_until_it_stops(
    redis_server: RedisServer,
) -> None:
    assert gc.get_freeze_count() == 0
    async with running(make_settings(redis_server.url)):
        assert gc.get_freeze_count() > 10_000  # the framework, the app, its clients
    assert gc.get_freeze_count() == 0  # all of it collectable again
