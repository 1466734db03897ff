"""Structured logs: one JSON line per request, with its request id and no secrets."""

import json
import logging
from pathlib import Path

import httpx
import pytest

from app.auth import ApiKey, hash_key
from app.logs import JsonFormatter
from tests.conftest import make_settings, serve
from tests.redis_server import RedisServer
from tests.service import ServiceProcess


@pytest.mark.anyio
async def test_each_request_logs_one_line_with_its_request_id(
    redis_server: RedisServer, redis_client: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async for client in serve(make_settings(redis_server.url)):
        given = await client.post(
            "/v1/streams/s/values", json={"value": 1.0}, headers={"X-Request-ID": "trace-42"}
        )
        made = await client.get("/v1/streams/s?debug=1")
        bad = await client.get("/v1/streams/s", headers={"X-Request-ID": "has space"})
    assert given.headers["x-request-id"] == "trace-42"
    assert len(made.headers["x-request-id"]) == 32
    assert bad.headers["x-request-id"] != "has space"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "NO API KEYS CONFIGURED" in warnings[0].getMessage()
    access = [r for r in caplog.records if r.name == "app.access"]
    lines = [json.loads(JsonFormatter().format(r)) for r in access]
    assert [line["request_id"] for line in lines] == [
        "trace-42",
        made.headers["x-request-id"],
        bad.headers["x-request-id"],
    ]
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [
        ("POST", "/v1/streams/s/values", 200),
        ("GET", "/v1/streams/s", 200),
        ("GET", "/v1/streams/s", 200),
    ]
    assert all(line["duration_ms"] >= 0 for line in lines)


def test_service_logs_json_lines_without_keys(
    tmp_path: Path, redis_server: RedisServer, redis_client: object
) -> None:
    key = ApiKey(name="ops", sha256=hash_key("top-secret-key"), scopes=frozenset({"admin"}))
    service = ServiceProcess(
        tmp_path,
        REDIS_URL=redis_server.url,
        EMA_KEY_PREFIX="test:",
        EMA_WORKERS="1",
        EMA_API_KEYS=json.dumps([key.model_dump(mode="json")]),
    )
    try:
        headers = {"Authorization": "Bearer top-secret-key"}
        httpx.post(f"{service.url}/v1/streams/s/values", json={"value": 1}, headers=headers)
        httpx.get(f"{service.url}/v1/streams/s", params={"api_key": "top-secret-key"})
        httpx.get(f"{service.url}/v1/streams/s", headers={"Authorization": "Bearer guess"})
    finally:
        service.process.terminate()
        service.process.wait(10)
    text = service.log.read_text()
    assert "top-secret-key" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    requests = [line for line in lines if line["logger"] == "app.access"]
    pushes = [line for line in requests if line["path"] == "/v1/streams/s/values"]
    assert [(line["status"], line["api_key"]) for line in pushes] == [(200, "ops")]
    statuses = [line["status"] for line in requests if line["path"] == "/v1/streams/s"]
    assert statuses == [200, 401]
