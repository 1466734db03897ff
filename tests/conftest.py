"""Fixtures: a real redis-server per session on a free port, flushed before each test, and the
app served in-process over httpx, once with the push fast path and once without.

The modules in CLUSTER_MODULES run twice: against the single redis-server and against a local
Redis Cluster of three primaries (`redis_server` is then either), with the service in cluster
mode (make_settings knows the cluster's URL)."""

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis

from app.main import create_app
from app.settings import Settings
from tests.redis_server import RedisCluster, RedisServer

# The foundation's semantic tests, unchanged, also run against a Redis Cluster.
CLUSTER_MODULES = {
    "test_semantics",
    "test_api",
    "test_validation",
    "test_concurrency",
    "test_values",
}
_CLUSTER_URLS: set[str] = set()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rpartition(".")[2]
    if module in CLUSTER_MODULES and "redis_server" in metafunc.fixturenames:
        metafunc.parametrize("redis_server", ["single", "cluster"], indirect=True, scope="session")


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
    _CLUSTER_URLS.add(cluster.url)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_server(request: pytest.FixtureRequest) -> RedisServer:
    """The single redis-server; for CLUSTER_MODULES, also the cluster (duck-typed alike)."""
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


def make_settings(redis_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {"redis_url": redis_url, "key_prefix": "test:", **overrides}
    if redis_url in _CLUSTER_URLS:
        values.setdefault("redis_cluster", True)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(params=[True, False], ids=["fast-path", "framework"])
def settings(request: pytest.FixtureRequest, redis_server: RedisServer) -> Settings:
    return make_settings(redis_server.url, fast_path=request.param)


async def serve(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ema.test") as client:
            yield client


@pytest.fixture
async def client(
    settings: Settings, redis_client: "redis.Redis"
) -> AsyncIterator[httpx.AsyncClient]:
    async for http in serve(settings):
        yield http


def snapshot(client: "redis.Redis") -> dict[str, object]:
    """Everything stored, to show that a rejected request changed nothing."""
    return {key: client.dump(key) for key in sorted(client.keys("*"))}
