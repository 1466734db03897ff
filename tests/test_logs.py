"""Structured logs: one JSON line per request, with its request id and no secrets."""

import asyncio
import io
import json
import logging
import os
import pty
import re
import sys
import weakref
from pathlib import Path

import anyio
import anyio.lowlevel
import httpx
import pytest

from app.auth import ApiKey, hash_key
from app.logs import JsonFormatter, TextFormatter, TurnBatchedHandler
from tests.redis_server import RedisServer
from tests.service import ServiceProcess
from tests.utils import make_settings, read_terminal, serve


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
        service.stop()
    text = service.log.read_text()
    assert "top-secret-key" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    requests = [line for line in lines if line["logger"] == "app.access"]
    pushes = [line for line in requests if line["path"] == "/v1/streams/s/values"]
    assert [(line["status"], line["api_key"]) for line in pushes] == [(200, "ops")]
    statuses = [line["status"] for line in requests if line["path"] == "/v1/streams/s"]
    assert statuses == [200, 401]


def run_on_a_terminal(tmp_path: Path, redis_url: str, **env: str) -> list[str]:
    """`python -m app` with stderr on a pseudo-terminal: the lines it logs while serving one
    request and stopping."""
    controller, terminal = pty.openpty()
    output = bytearray()
    try:
        try:
            service = ServiceProcess(
                tmp_path, output=terminal, REDIS_URL=redis_url, EMA_WORKERS="1", **env
            )
        finally:
            os.close(terminal)  # the service's copy is the last writer
        with service:
            httpx.get(f"{service.url}/v1/streams/nothing-here")
            service.stop()
            output += read_terminal(controller)  # the buffer, until the last writer is gone
    finally:
        os.close(controller)
    return output.decode().splitlines()


def test_a_terminal_gets_readable_lines(tmp_path: Path, redis_server: RedisServer) -> None:
    lines = run_on_a_terminal(tmp_path, redis_server.url)
    assert lines
    assert not [line for line in lines if "\x1b" in line]  # uvicorn's coloured copies
    for line in lines:
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
    [access] = [line for line in lines if " app.access: GET /v1/streams/" in line]
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d\.\d{3} INFO    app\.access: GET /v1/streams/nothing-here 404 "
        r" request_id=[0-9a-f]{32} method=GET .*status=404 duration_ms=[0-9.]+ .*",
        access.rstrip("\r"),
    ), access


def test_the_setting_overrides_the_terminal(tmp_path: Path, redis_server: RedisServer) -> None:
    lines = run_on_a_terminal(tmp_path, redis_server.url, EMA_LOG_FORMAT="json")
    entries = [json.loads(line) for line in lines]
    assert [e["status"] for e in entries if e.get("path") == "/v1/streams/nothing-here"] == [404]


def test_text_lines_carry_the_extra_fields_and_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("t").makeRecord(
            "t", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info(), extra={"n": 3}
        )
    first, *rest = TextFormatter().format(record).splitlines()
    assert first.endswith(" ERROR   t: failed x  n=3")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: boom"


class Writes(io.StringIO):
    """A stream that remembers each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.mark.anyio
async def test_lines_logged_in_one_event_loop_turn_go_out_in_one_write() -> None:
    stream = Writes()
    handler = TurnBatchedHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("test.batched")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("one")
        log.warning("two")
        assert stream.writes == []  # not before the turn ends
        await anyio.lowlevel.checkpoint()
        assert stream.writes == ["one\ntwo\n"]
        await asyncio.to_thread(log.warning, "from a thread")  # no loop there: at once
        assert stream.writes[1:] == ["from a thread\n"]
        log.warning("at exit")
        logging.shutdown([weakref.ref(handler)])  # what logging does as the process exits
        assert stream.writes[2:] == ["at exit\n"]
    finally:
        log.removeHandler(handler)
