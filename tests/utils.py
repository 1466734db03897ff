"""What several test modules share, in one place: the backends a test runs on, settings and
the app served in-process, snapshots of Redis, what the service offers, a proxy that drops
connections, a reader of event streams, the deployment files (compose, Prometheus, Grafana) and
the check that a run leaves no process behind.

Fixtures live in tests/conftest.py; processes are started by tests/service.py (the service)
and tests/redis_server.py (redis-server, a local Redis Cluster)."""

import contextlib
import json
import os
import re
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import redis
import yaml
from ema_client import Features, Retry
from fastapi import FastAPI

from app.main import create_app
from app.settings import Settings

# The backends a test runs on, read at the test (a mark on it, or a module's `pytestmark`):
# `redis_server` is then the session's single redis-server, or its local Redis Cluster of three
# primaries, and make_settings puts the service in cluster mode for the latter.
SINGLE_AND_CLUSTER = pytest.mark.parametrize(
    "redis_server", ["single", "cluster"], indirect=True, scope="session"
)

# The URLs of the clusters the session's fixtures started (tests/conftest.py).
CLUSTER_URLS: set[str] = set()


def make_settings(redis_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {"redis_url": redis_url, "key_prefix": "test:", **overrides}
    if redis_url in CLUSTER_URLS:
        values.setdefault("redis_cluster", True)
    return Settings(**values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan, and an httpx client of it in-process."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ema.test") as client:
            yield app, client


async def serve(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan, over httpx in-process."""
    async with running(settings) as (_, client):
        yield client


def snapshot(client: "redis.Redis") -> dict[str, object]:
    """Everything stored, to show that a rejected request changed nothing."""
    return {key: client.dump(key) for key in sorted(client.keys("*"))}


# What the service offers, read from the same OpenAPI schema its /openapi.json serves.
FEATURES = Features.from_openapi(create_app(Settings(redis_url="redis://127.0.0.1:1/0")).openapi())
needs_events = pytest.mark.skipif(
    not FEATURES.events, reason="the service has no GET /v1/streams/{name}/events yet"
)
needs_idempotency = pytest.mark.skipif(
    not FEATURES.idempotency, reason="the service does not take Idempotency-Key yet"
)
needs_bulk = pytest.mark.skipif(not FEATURES.bulk, reason="the service has no POST /v1/values yet")
# Keys are checked before routing and not (yet) declared in the schema: look for the setting.
needs_api_keys = pytest.mark.skipif(
    not (FEATURES.api_keys or "api_keys" in Settings.model_fields),
    reason="the service does not check API keys yet",
)

# Client retries in milliseconds: the tests wait for nothing.
FAST = Retry(attempts=3, backoff=0.005, max_delay=0.02)


# --- a proxy that drops connections -------------------------------------------------------------

_REQUEST_HEAD = re.compile(rb"(GET|POST|PUT|DELETE) (\S+) HTTP/1\.1\r\n((?:[^\r\n]+\r\n)*)\r\n")


class Proxy:
    """A loopback TCP proxy in front of the service. It records what clients send, and drops
    connections: the next `drop_responses` responses are swallowed and their connection closed
    (the service has served the request; the client sees the connection drop), and `cut()`
    closes every open connection."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.drop_responses = 0
        self.connections = 0
        self.sent: list[bytearray] = []
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def requests(self) -> list[tuple[str, str, dict[str, str]]]:
        """(method, path, headers) of every request seen, in order per connection."""
        with self.lock:
            data = [bytes(sent) for sent in self.sent]
        found = []
        for sent in data:
            for method, path, head in _REQUEST_HEAD.findall(sent):
                pairs = (line.split(": ", 1) for line in head.decode().splitlines())
                headers = {key.lower(): value for key, value in pairs}
                found.append((method.decode(), path.decode(), headers))
        return found

    def cut(self) -> None:
        with self.lock:
            sockets = list(self.open)
        for sock in sockets:
            _shut(sock)

    def close(self) -> None:
        _shut(self.listener)  # wakes the accepting thread; close alone does not
        self.listener.close()
        self.cut()
        for thread in self.threads:
            thread.join(5)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            sent = bytearray()
            with self.lock:
                self.connections += 1
                self.sent.append(sent)
                self.open |= {client, upstream}
            for target in (self._forward_requests, self._forward_responses):
                thread = threading.Thread(target=target, args=(client, upstream, sent), daemon=True)
                self.threads.append(thread)
                thread.start()

    def _forward_requests(
        self, client: socket.socket, upstream: socket.socket, sent: bytearray
    ) -> None:
        try:
            while data := client.recv(65536):
                with self.lock:
                    sent += data
                upstream.sendall(data)
        except OSError:
            pass
        _shut(upstream)

    def _forward_responses(
        self, client: socket.socket, upstream: socket.socket, _: bytearray
    ) -> None:
        try:
            while data := upstream.recv(65536):
                with self.lock:
                    drop = self.drop_responses > 0
                    self.drop_responses -= drop
                if drop:
                    break
                client.sendall(data)
        except OSError:
            pass
        _shut(client)
        _shut(upstream)
        with self.lock:
            self.open -= {client, upstream}
        client.close()
        upstream.close()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)


# --- event streams -------------------------------------------------------------------------------

Event = tuple[str, str | None, dict[str, object]]


class EventReader:
    """Parses an SSE response into (event, id, data), skipping comments after noting them."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.iter_lines()
        self.comments: list[str] = []

    def next(self) -> Event:
        kind, event_id, data = "message", None, ""
        for line in self.lines:
            if line.startswith(":"):
                self.comments.append(line)
            elif line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("id: "):
                event_id = line.removeprefix("id: ")
            elif line.startswith("data: "):
                data = line.removeprefix("data: ")
            elif line == "" and data:
                return kind, event_id, json.loads(data)
        raise EOFError

    def wait_subscribed(self) -> None:
        for line in self.lines:
            if line == ": subscribed":
                return
        raise EOFError


@contextmanager
def subscribe(url: str, headers: dict[str, str] | None = None) -> Iterator[EventReader]:
    with httpx.stream("GET", url, headers=headers, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        reader = EventReader(response)
        reader.wait_subscribed()
        yield reader


# --- the deployment files, as docker-compose.yml mounts them ----------------------------------

ROOT = Path(__file__).resolve().parent.parent


@cache
def compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(document, dict)
    return document


def service(name: str) -> dict[str, Any]:
    found = compose()["services"].get(name)
    assert isinstance(found, dict), f"docker-compose.yml has no {name!r} service"
    return found


def mounts(name: str) -> dict[str, str]:
    """Bind mounts of a service: container path -> repository path (short syntax)."""
    found = {}
    for volume in service(name).get("volumes") or []:
        source, target, *_ = str(volume).split(":")
        if source.startswith("./"):
            found[target] = source.removeprefix("./")
    return found


def container_file(name: str, path: str) -> Path:
    """The repository file that a service sees at `path`, through its bind mounts."""
    for target, source in mounts(name).items():
        inside = PurePosixPath(path)
        if inside == PurePosixPath(target) or PurePosixPath(target) in inside.parents:
            return ROOT / source / inside.relative_to(target)
    raise AssertionError(f"{name} sees nothing at {path}")


def flag(name: str, option: str) -> str:
    for word in service(name).get("command") or []:
        if str(word).startswith(f"{option}="):
            return str(word).split("=", 1)[1]
    raise AssertionError(f"{name} has no {option}")


@cache
def prometheus_config() -> dict[str, Any]:
    path = container_file("prometheus", flag("prometheus", "--config.file"))
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict)
    return config


def rules() -> Iterator[dict[str, Any]]:
    for rule_file in prometheus_config().get("rule_files", []):
        document = yaml.safe_load(container_file("prometheus", rule_file).read_text())
        for group in document["groups"]:
            yield from group["rules"]


def provisioning(kind: str) -> list[dict[str, Any]]:
    folder = container_file("grafana", f"/etc/grafana/provisioning/{kind}")
    documents = [yaml.safe_load(path.read_text()) for path in sorted(folder.glob("*.y*ml"))]
    assert documents, f"no {kind} provisioned"
    return documents


def dashboards() -> dict[str, dict[str, Any]]:
    found = {}
    for document in provisioning("dashboards"):
        for provider in document["providers"]:
            folder = container_file("grafana", provider["options"]["path"])
            for path in sorted(folder.glob("*.json")):
                found[path.name] = json.loads(path.read_text())
    assert found, "no dashboard JSON where the providers look"
    return found


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


# --- processes that outlive the run -------------------------------------------------------------

# Set in the test process's environment (tests/conftest.py) and so inherited by every process
# the tests start, orphans included (an orphan is re-parented away from the test process tree).
RUN_MARK = "TESTS_RUN_ID"


def processes_marked(run_id: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment carries this run's mark,
    other than this one."""
    needle = f"{RUN_MARK}={run_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if command:  # a zombie has none, and is gone once reaped
            found.append((int(entry.name), command))
    return found


def read_terminal(controller: int) -> bytes:
    """All a pseudo-terminal's programs write, until the last of them closes it."""
    output = bytearray()
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: no writer left
            break
        if not chunk:
            break
        output += chunk
    return bytes(output)
