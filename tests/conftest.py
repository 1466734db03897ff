"""Fixtures: a real redis-server per session on a free port, flushed before each test, and the
app served in-process over httpx, once with the push fast path and once without.

A test runs on the single redis-server unless it says otherwise: marked (or its module marked)
with tests.utils.SINGLE_AND_CLUSTER, it runs twice, the second time with `redis_server` a local
Redis Cluster of three primaries and the service in cluster mode.

At the end of the run, no process the tests started may remain: the run fails if one does."""

import contextlib
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis

from app.settings import Settings
from tests.redis_server import RedisCluster, RedisServer
from tests.utils import CLUSTER_URLS, RUN_MARK, make_settings, processes_marked, serve

# Inherited by every process the tests start, so that one left running can be found. A fresh
# one per run: a run started from inside another sees only its own processes.
RUN_ID = os.environ[RUN_MARK] = uuid.uuid4().hex


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def single_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """Three primaries, no replicas (tests/test_cluster.py starts its own for failovers)."""
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster")).start()
    CLUSTER_URLS.add(cluster.url)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_server(request: pytest.FixtureRequest) -> RedisServer:
    """The single redis-server; under SINGLE_AND_CLUSTER, also the cluster (duck-typed alike)."""
    backend = getattr(request, "param", "single")
    server: RedisServer = request.getfixturevalue(
        "redis_cluster" if backend == "cluster" else "single_redis_server"
    )
    return server


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator["redis.Redis"]:
    """A plain client on the test Redis, emptied (data and script cache) before the test."""
    with redis_server.client() as client:
        client.flushall()
        client.script_flush()
        yield client


@pytest.fixture(params=[True, False], ids=["fast-path", "framework"])
def settings(request: pytest.FixtureRequest, redis_server: RedisServer) -> Settings:
    return make_settings(redis_server.url, fast_path=request.param)


@pytest.fixture
async def client(
    settings: Settings, redis_client: "redis.Redis"
) -> AsyncIterator[httpx.AsyncClient]:
    async for http in serve(settings):
        yield http


_LEFTOVERS: list[tuple[int, str]] = []


def pytest_sessionfinish(session: pytest.Session) -> None:
    """After every fixture has been torn down: what the tests started must have ended."""
    deadline = time.monotonic() + 5  # a killed process may take a moment to go
    while (left := processes_marked(RUN_ID)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        _LEFTOVERS.extend(left)
        for pid, _ in left:  # not to burden the machine, nor the next run's ports
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _LEFTOVERS:
        terminalreporter.section("processes left running", red=True)
        for pid, command in _LEFTOVERS:
            terminalreporter.line(f"{pid}: {command}")
        terminalreporter.line(
            f"{len(_LEFTOVERS)} processes started by the tests outlived them (killed now): "
            "end each one in the test or fixture that starts it (tests/service.py)"
        )
