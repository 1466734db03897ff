"""API keys: 401 without one, 403 outside its scope or prefixes, on every route."""

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis

from app.auth import ApiKey, hash_key
from app.settings import Settings
from tests.redis_server import RedisServer
from tests.service import ServiceProcess
from tests.utils import make_settings, serve, snapshot

pytestmark = pytest.mark.anyio

KEYS = {
    "reader": ("read",),
    "writer": ("write",),
    "admin": ("admin",),
    "cpu-writer": ("write",),
    "cpu-reader": ("read",),
}


def key_entries() -> list[ApiKey]:
    return [
        ApiKey(
            name=name,
            sha256=hash_key(f"secret-{name}"),
            scopes=frozenset(scopes),  # type: ignore[arg-type]
            prefixes=("cpu.",) if name.startswith("cpu-") else None,
        )
        for name, scopes in KEYS.items()
    ]


@pytest.fixture(params=[True, False], ids=["fast-path", "framework"])
def settings(request: pytest.FixtureRequest, redis_server: RedisServer) -> Settings:
    return make_settings(redis_server.url, fast_path=request.param, api_keys=key_entries())


@pytest.fixture
async def client(
    settings: Settings, redis_client: "redis.Redis"
) -> AsyncIterator[httpx.AsyncClient]:
    async for http in serve(settings):
        admin = {"Authorization": "Bearer secret-admin"}
        for name in ("cpu.a", "mem.a"):
            await http.put(f"/v1/streams/{name}", json={"decay": 0.5, "history": 5}, headers=admin)
            await http.post(f"/v1/streams/{name}/values", json={"value": 1}, headers=admin)
        yield http


# (method, path, body, permission needed, stream prefix involved)
ROUTES = [
    ("GET", "/v1/streams/{s}", None, "read"),
    ("GET", "/v1/streams/{s}/history", None, "read"),
    ("POST", "/v1/streams/{s}/values", {"value": 2.0}, "write"),
    ("PUT", "/v1/streams/{s}", {"decay": 0.5}, "admin"),
    ("DELETE", "/v1/streams/{s}", None, "admin"),
    ("GET", "/v1/streams?prefix={s}", None, "read"),
]


def allowed(key: str, permission: str, stream: str) -> bool:
    scopes = KEYS[key]
    in_scope = permission in scopes or "admin" in scopes
    return in_scope and (not key.startswith("cpu-") or stream.startswith("cpu."))


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("stream", ["cpu.a", "mem.a"])
@pytest.mark.parametrize("route", ROUTES, ids=[f"{m} {p}" for m, p, *_ in ROUTES])
async def test_each_key_may_do_exactly_what_its_scopes_and_prefixes_allow(
    client: httpx.AsyncClient,
    redis_client: "redis.Redis",
    key: str,
    stream: str,
    route: tuple[str, str, object, str],
) -> None:
    method, path, body, permission = route
    before = snapshot(redis_client)
    response = await client.request(
        method,
        path.format(s=stream),
        json=body,
        headers={"Authorization": f"Bearer secret-{key}"},
    )
    if allowed(key, permission, stream):
        assert response.is_success, response.text
    else:
        assert response.status_code == 403, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert key in response.json()["detail"]
        assert snapshot(redis_client) == before


@pytest.mark.parametrize("route", ROUTES, ids=[f"{m} {p}" for m, p, *_ in ROUTES])
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic secret-admin"}],
    ids=["none", "unknown", "not-bearer"],
)
async def test_no_valid_key_is_401(
    client: httpx.AsyncClient,
    redis_client: "redis.Redis",
    route: tuple[str, str, object, str],
    headers: dict[str, str],
) -> None:
    method, path, body, _ = route
    before = snapshot(redis_client)
    response = await client.request(method, path.format(s="cpu.a"), json=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.headers["content-type"] == "application/problem+json"
    assert snapshot(redis_client) == before


@pytest.mark.parametrize("path", ["/v1/streams/cpu.a/events", "/v1/events?prefix=mem."])
async def test_subscriptions_need_a_read_key(client: httpx.AsyncClient, path: str) -> None:
    assert (await client.get(path)).status_code == 401
    writer = {"Authorization": "Bearer secret-writer"}
    assert (await client.get(path, headers=writer)).status_code == 403
    cpu_reader = {"Authorization": "Bearer secret-cpu-reader"}
    expected = 403 if "mem." in path else None
    if expected:
        assert (await client.get(path, headers=cpu_reader)).status_code == expected


async def test_probes_and_docs_are_public(client: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        assert (await client.get(path)).status_code == 200, path


async def test_unknown_routes_need_a_key_too(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v2/anything")).status_code == 401
    admin = {"Authorization": "Bearer secret-admin"}
    assert (await client.get("/v2/anything", headers=admin)).status_code == 404


def test_subscription_with_a_read_key_streams_events(
    tmp_path: Path, redis_server: RedisServer, redis_client: "redis.Redis"
) -> None:
    keys = json.dumps([entry.model_dump(mode="json") for entry in key_entries()])
    service = ServiceProcess(
        tmp_path,
        REDIS_URL=redis_server.url,
        EMA_KEY_PREFIX="test:",
        EMA_WORKERS="1",
        EMA_API_KEYS=keys,
    )
    try:
        url = f"{service.url}/v1/streams/cpu.a/events"
        # EventSource cannot send headers: the key may come as a query parameter on GET.
        with httpx.stream("GET", url, params={"api_key": "secret-cpu-reader"}) as events:
            assert events.status_code == 200
            lines = events.iter_lines()
            assert ": subscribed" in (next(lines), next(lines), next(lines))
            pushed = httpx.post(
                f"{service.url}/v1/streams/cpu.a/values",
                json={"value": 3.0},
                headers={"Authorization": "Bearer secret-cpu-writer"},
            )
            assert pushed.status_code == 200
            assert next(line for line in lines if line.startswith("data: ")).count('"count":1')
        with httpx.stream("GET", url, params={"api_key": "secret-writer"}) as refused:
            assert refused.status_code == 403
    finally:
        service.kill()
