"""Hostile clients over real HTTP (`python -m app`): oversized headers get a 431, and a client
too slow to send its request (slowloris, a body that never comes, nothing at all) gets a 408,
its connection closed; well-behaved keep-alive connections and event streams are untouched."""

import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.service import ServiceProcess

TIMEOUT = 1.0  # EMA_REQUEST_TIMEOUT for these tests
SLOWLORIS = [bytes([b]) for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"]
MAX_HEAD = 8192  # EMA_MAX_HEADER_BYTES


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    service = ServiceProcess(
        tmp_path_factory.mktemp("protocol"),
        EMA_WORKERS="1",
        EMA_REQUEST_TIMEOUT=str(TIMEOUT),
        EMA_MAX_HEADER_BYTES=str(MAX_HEAD),
        EMA_SSE_HEARTBEAT="0.2",
    )
    yield service
    service.kill()


def exchange(port: int, *parts: bytes, pause: float = 0.0) -> bytes:
    """Send `parts` (pausing between them), then read until the server closes the connection;
    a connection reset after the server's answer counts as closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        try:
            for part in parts:
                sock.sendall(part)
                time.sleep(pause)
        except OSError:
            pass  # the server answered and closed while we were still sending
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return received


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def problem_status(response: bytes) -> int:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: application/problem+json" in head.lower()
    assert b"connection: close" in head.lower()
    return int(httpx.Response(200, content=body).json()["status"])


@pytest.mark.parametrize("size", [MAX_HEAD + 1, 100_000, 10_000_000])
def test_an_oversized_header_is_431_and_closed(service: ServiceProcess, size: int) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    response = exchange(service.port, request)
    # A 10 MB header is refused at its first 64 KiB: the reset can overtake the 431.
    if response or size < 1_000_000:
        assert status(response) == problem_status(response) == 431


def test_many_headers_over_the_limit_are_431(service: ServiceProcess) -> None:
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 100) for i in range(100))
    response = exchange(service.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert status(response) == 431


def test_headers_under_the_limit_are_served(service: ServiceProcess) -> None:
    response = httpx.get(f"{service.url}/healthz", headers={"X-Big": "a" * (MAX_HEAD - 200)})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param(SLOWLORIS, id="slowloris"),
        pytest.param(
            [b"POST /v1/streams/slow/values HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
             b'{"value":'],
            id="short body",
        ),
    ],
)  # fmt: skip
def test_a_request_not_sent_in_time_is_408_and_closed(
    service: ServiceProcess, parts: list[bytes]
) -> None:
    started = time.monotonic()
    response = exchange(service.port, *parts, pause=0.3)
    assert problem_status(response) == status(response) == 408
    assert time.monotonic() - started < 10 * TIMEOUT + len(parts) * 0.3
    assert httpx.get(f"{service.url}/v1/streams/slow").status_code == 404  # nothing applied


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(
    service: ServiceProcess,
) -> None:
    started = time.monotonic()
    assert exchange(service.port) == b""
    assert time.monotonic() - started < 10 * TIMEOUT


def test_slow_clients_in_numbers_are_all_closed(service: ServiceProcess) -> None:
    with ThreadPoolExecutor(50) as pool:
        responses = list(
            pool.map(lambda _: exchange(service.port, *SLOWLORIS, pause=0.3), range(50))
        )
    assert {status(response) for response in responses} == {408}
    assert httpx.get(f"{service.url}/healthz").status_code == 200


def test_keep_alive_and_event_streams_outlast_the_request_timeout(service: ServiceProcess) -> None:
    with httpx.Client(base_url=service.url) as http:
        assert http.get("/healthz").status_code == 200
        time.sleep(2 * TIMEOUT)  # idle between requests: uvicorn's keep-alive timeout (5 s)
        assert http.get("/healthz").status_code == 200
        assert http.get("/healthz").headers.get("connection") != "close"
    heartbeats = 0
    deadline = time.monotonic() + 3 * TIMEOUT
    with httpx.stream("GET", f"{service.url}/v1/streams/quiet/events", timeout=5) as events:
        assert events.status_code == 200
        for line in events.iter_lines():
            heartbeats += line == ": keep-alive"
            if time.monotonic() > deadline:
                break
    assert heartbeats >= 5
