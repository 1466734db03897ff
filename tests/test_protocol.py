"""Hostile clients over real HTTP (`python -m app`): oversized headers get a 431, and a client
too slow to send its request (slowloris, a body that never comes, nothing at all) gets a 408,
its connection closed; well-behaved keep-alive connections and event streams are untouched.
And a response's head and body leave in one write, whole and in order."""

import asyncio
import socket
import struct
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from app.protocol import BoundedHttpProtocol, write_now_of
from tests.redis_server import free_port
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


def read_response(sock: socket.socket, pending: bytes = b"") -> tuple[bytes, bytes]:
    """One response with a content-length from `sock`, and what arrived after it."""
    while b"\r\n\r\n" not in pending:
        pending += sock.recv(65536)
    head, _, rest = pending.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    while len(rest) < length:
        rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


def data_segments_received(sock: socket.socket) -> int:
    # Linux's struct tcp_info: tcpi_data_segs_in, the segments that carried data, at byte 152.
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)
    return int(struct.unpack_from("<I", info, 152)[0])


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


@pytest.mark.skipif(sys.platform != "linux", reason="counts segments with Linux's TCP_INFO")
@pytest.mark.parametrize(
    "request_line",
    [
        b"POST /v1/streams/segments/values",  # the push fast path
        b"GET /v1/streams/segments",  # the read fast path
        b"GET /healthz",  # a framework route
        b"GET /v1/streams/missing",  # a problem
    ],
)
def test_a_small_response_leaves_in_one_segment(
    service: ServiceProcess, request_line: bytes
) -> None:
    # uvicorn writes a head and a body apart: sent as they come, they are two TCP segments
    # (loopback carries 64 KiB in one), so two sends, two wake-ups of the client.
    body = b'{"value": 1}'
    request = request_line + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    with socket.create_connection(("127.0.0.1", service.port), timeout=15) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(3):
            before = data_segments_received(sock)
            sock.sendall(request)
            response, rest = read_response(sock)
            assert rest == b""
            assert status(response) in (200, 404)
            assert data_segments_received(sock) - before == 1


def test_pipelined_requests_are_answered_whole_and_in_order(service: ServiceProcess) -> None:
    paths = [b"/v1/streams/piped-%d" % i for i in range(5)]
    for i, path in enumerate(paths[:3]):
        assert httpx.post(f"{service.url}{path.decode()}/values", json={"value": i}).is_success
    with socket.create_connection(("127.0.0.1", service.port), timeout=15) as sock:
        sock.sendall(b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path for path in paths))
        rest = b""
        for i, path in enumerate(paths):
            response, rest = read_response(sock, rest)
            body = httpx.Response(200, content=response.partition(b"\r\n\r\n")[2]).json()
            if i < 3:
                assert status(response) == 200
                assert (body["name"], body["value"]) == (path.decode().split("/")[-1], i)
            else:
                assert status(response) == 404
                assert path.decode() in body["instance"]


def test_a_response_before_close_arrives_whole(service: ServiceProcess) -> None:
    response = exchange(
        service.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    head, _, body = response.partition(b"\r\n\r\n")
    assert status(response) == 200
    assert b"connection: close" in head.lower()
    assert httpx.Response(200, content=body).json()["status"] == "ok"


@pytest.mark.anyio
async def test_write_now_writes_chunks_of_a_started_response_while_the_client_keeps_up() -> None:
    taken: dict[str, object] = {}
    chunk = b"." * 65536
    declined = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        write_now = write_now_of(scope)
        if scope["method"] != "GET":
            taken["POST"] = write_now
            await send({"type": "http.response.start", "status": 204})
            await send({"type": "http.response.body"})
            return
        assert write_now is not None
        taken["before the head"] = write_now(b"early")
        start = {"type": "http.response.start", "status": 200, "headers": []}
        await send(start)  # no content-length: chunked
        taken["first"] = write_now(b"first")
        # The client no longer reads: what the kernel does not take piles up in the
        # transport, until it is over its high-water mark and write_now declines.
        written = 0
        while written < 1024 and write_now(chunk):  # 64 MB at most
            written += 1
            await asyncio.sleep(0)  # the turn ends: what was written goes to the transport
        taken["written"] = written
        declined.set()
        await send({"type": "http.response.body", "body": b"last", "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        taken["after the end"] = write_now(b"late")

    port = free_port()
    config = uvicorn.Config(
        app, port=port, http=BoundedHttpProtocol, lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(1000):
            if server.started:
                break
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 204")
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"transfer-encoding: chunked" in head.lower()
            assert await reader.readexactly(len(b"5\r\nfirst\r\n")) == b"5\r\nfirst\r\n"
            await asyncio.wait_for(declined.wait(), 10)  # reading nothing meanwhile
            body = b""
            while not body.endswith(b"0\r\n\r\n"):
                body += await asyncio.wait_for(reader.read(2**20), 10)
        finally:
            writer.close()
    finally:
        server.should_exit = True
        await serving
    assert taken["POST"] is None  # offered to GET requests only
    assert taken["before the head"] is False
    assert taken["first"] is True
    written = taken["written"]
    assert isinstance(written, int)
    # Bounded: the kernel's buffers (a few MB on loopback) and the transport's high-water mark.
    assert 0 < written < 1024
    assert body == b"10000\r\n%s\r\n" % chunk * written + b"4\r\nlast\r\n0\r\n\r\n"
    assert taken["after the end"] is False
