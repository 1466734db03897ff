"""The `ema` command through its installed entry point, in subprocesses, against the real
service: every command, human and JSON output, where the address and key come from, `watch`
bounded in time and in updates, `serve`, and errors as one line with a non-zero status."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from ema_client import Client

from tests.redis_server import RedisServer, free_port
from tests.service import ServiceProcess
from tests.utils import FAST, Proxy, needs_events

EMA = Path(sys.executable).parent / "ema"


@pytest.fixture(scope="module", autouse=True)
def installed() -> None:
    if not EMA.exists():
        pytest.fail(f"{EMA} is missing: run ./scripts/bootstrap to install the console script")


@pytest.fixture(scope="module")
def service(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    with ServiceProcess(
        tmp_path_factory.mktemp("cli-service"),
        REDIS_URL=redis_server.url,
        EMA_KEY_PREFIX=f"c{uuid.uuid4().hex[:8]}:",
        EMA_WORKERS="1",
    ) as running:
        yield running


@pytest.fixture
def name() -> str:
    return f"c.{uuid.uuid4().hex[:12]}"


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMA_", "REDIS_"))}
    return env | extra


def run(*args: str, url: str | None, **env: str) -> subprocess.CompletedProcess[str]:
    extra = env if url is None else {"EMA_URL": url, **env}
    return subprocess.run(
        [str(EMA), *args],
        env=environment(**extra),
        capture_output=True,
        text=True,
        timeout=30,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    assert result.returncode == status, result
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("ema")
    assert text in result.stderr
    assert "Traceback" not in result.stderr


def test_push_get_ls_rm_for_people(service: ServiceProcess, name: str) -> None:
    created = run("create", name, "--decay", "0.99", "--initial", "0", url=service.url)
    assert created.returncode == 0, created.stderr
    pushed = run("push", name, "5", "--num-updates", "0", url=service.url)
    assert pushed.stdout == f"{name}  value 4.5  count 1\n"
    run("push", name, "10", "--num-updates", "10000", url=service.url)
    run("push", name, "10", "--num-updates", "10000", url=service.url)

    shown = run("get", name, url=service.url).stdout.splitlines()
    assert shown[0] == name
    assert "  value       4.60945" in shown
    assert "  count       3" in shown
    assert "  config      decay 0.99, initial 0.0, auto_num_updates off" in shown

    run("push", f"{name}.b", "1", "2", "3", url=service.url)
    assert run("ls", "--prefix", name, url=service.url).stdout == f"{name}\n{name}.b\n"
    assert run("rm", name, f"{name}.b", url=service.url).stdout == (
        f"deleted {name}\ndeleted {name}.b\n"
    )
    assert_one_line_error(run("get", name, url=service.url), 1, f"stream '{name}' does not exist")


def test_json_output_anywhere_on_the_line(service: ServiceProcess, name: str) -> None:
    pushed = json.loads(run("--json", "push", name, "5", url=service.url).stdout)
    assert (pushed["name"], pushed["value"], pushed["count"]) == (name, 5.0, 1)
    state = json.loads(run("get", name, "--json", url=service.url).stdout)
    assert state == pushed
    assert json.loads(run("ls", "--prefix", name, "--json", url=service.url).stdout) == [name]
    assert json.loads(run("rm", name, "--json", url=service.url).stdout) == {"deleted": name}


def test_the_address_comes_from_url_then_ema_url(service: ServiceProcess, name: str) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    with Client(service.url) as ema:
        ema.push(name, 1)
    cases = [
        (("get", name, "--url", service.url), nowhere),
        (("--url", service.url, "get", name), nowhere),
        (("get", name), service.url),
        (("get", name), nowhere),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda case: run(*case[0], url=case[1]), cases))
    assert [result.returncode for result in results] == [0, 0, 0, 1]
    assert_one_line_error(results[-1], 1, "cannot connect")


def test_the_api_key_comes_from_the_option_then_ema_api_key(
    service: ServiceProcess, name: str
) -> None:
    proxy = Proxy(service.port)
    try:
        run("push", name, "1", url=proxy.url, EMA_API_KEY="from-env")
        run("get", name, "--api-key", "from-option", url=proxy.url, EMA_API_KEY="from-env")
        run("get", name, url=proxy.url)
        sent = [headers.get("authorization") for _, _, headers in proxy.requests()]
        assert sent == ["Bearer from-env", "Bearer from-option", None]
    finally:
        proxy.close()


BAD_ARGUMENTS = [
    ((), "required: COMMAND"),
    (("frob",), "invalid choice: 'frob'"),
    (("push", "cpu"), "required: VALUE"),
    (("push", "cpu", "five"), "invalid float value: 'five'"),
    (("push", "cpu", "1", "2", "--num-updates", "3"), "--num-updates goes with a single"),
    (("watch", "cpu", "--count", "0"), "must be positive"),
    (("get", "cpu", "--timeout", "-1"), "must be positive"),
    (("serve", "--port", "http"), "invalid int value"),
]


def test_bad_arguments_are_one_line_and_status_2() -> None:
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda case: run(*case[0], url=None), BAD_ARGUMENTS))
    for (_, text), result in zip(BAD_ARGUMENTS, results, strict=True):
        assert_one_line_error(result, 2, text)


def test_service_errors_are_one_line_and_status_1(service: ServiceProcess) -> None:
    cases = [
        (("push", "no spaces", "1"), "422 Unprocessable Entity: path.name"),
        (("push", "cpu", "nan"), "finite number"),
        (("create", "cpu", "--decay", "2"), "decay"),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda case: run(*case[0], url=service.url), cases))
    for (_, text), result in zip(cases, results, strict=True):
        assert_one_line_error(result, 1, text)


def watch(*args: str, url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(EMA), "watch", *args],
        env=environment(EMA_URL=url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def watch_pushes(service: ServiceProcess, name: str, *options: str) -> list[dict[str, object]]:
    """Runs `ema watch --json --count 3`, pushing once it has shown the stream's state until
    it stops by itself; returns what it printed."""
    with Client(service.url, retry=FAST) as ema:
        ema.create(name, decay=0.5, initial=0)
        options = ("--json", "--count", "3", "--duration", "10", *options)
        with watch(name, *options, url=service.url) as process:
            try:
                assert process.stdout is not None
                first = json.loads(process.stdout.readline())
                deadline = time.monotonic() + 15
                while process.poll() is None and time.monotonic() < deadline:
                    ema.push(name, 8)
                    time.sleep(0.1)
                rest, errors = process.communicate(timeout=5)
            finally:
                process.kill()
    assert process.returncode == 0, errors
    lines = [first, *(json.loads(line) for line in rest.splitlines())]
    counts = [line["count"] for line in lines]
    assert counts[0] == 0
    assert counts[-1] >= 3
    assert counts == sorted(set(counts))  # a line per change, none repeated
    for line in lines:  # pushes of 8 from 0 with decay 0.5: 4, 6, 7, ...
        assert (line["name"], line["value"]) == (name, 8 * (1 - 0.5 ** line["count"]))
    return lines


def test_watch_polls_until_count_updates(service: ServiceProcess, name: str) -> None:
    watch_pushes(service, name, "--poll", "--interval", "0.05")


@needs_events
def test_watch_follows_events_until_count_updates(service: ServiceProcess, name: str) -> None:
    lines = watch_pushes(service, name)
    # Pushes made before the subscription was open are caught up by a GET: few lines skip.
    assert len(lines) >= 3


def test_watch_stops_after_its_duration(service: ServiceProcess, name: str) -> None:
    with Client(service.url) as ema:
        ema.push(name, 3)
    started = time.monotonic()
    result = run("watch", name, "--duration", "0.5", "--interval", "0.1", url=service.url)
    assert result.returncode == 0, result.stderr
    assert 0.5 <= time.monotonic() - started < 10
    assert result.stdout.startswith(f"{name}  3  ")
    assert result.stdout.rstrip().endswith("last 3  n=1")
    assert run("watch", "missing", "--duration", "0.3", url=service.url).stdout == ""


def test_watch_says_when_the_service_is_unreachable() -> None:
    result = run("watch", "cpu", "--duration", "5", url=f"http://127.0.0.1:{free_port()}")
    assert_one_line_error(result, 1, "cannot connect")


def test_serve_runs_the_service(redis_server: RedisServer, tmp_path: Path, name: str) -> None:
    port = free_port()
    with ServiceProcess(
        tmp_path,
        command=[str(EMA), "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        port=port,
        REDIS_URL=redis_server.url,
        EMA_KEY_PREFIX="cli-serve:",
    ) as server:
        assert json.loads(run("push", name, "2", "--json", url=server.url).stdout)["value"] == 2.0
        server.process.send_signal(signal.SIGTERM)
        # A clean stop: uvicorn shuts down, then exits by the signal it caught, as it re-raises.
        assert server.process.wait(20) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in server.log.read_text()


def test_version() -> None:
    result = run("--version", url=None)
    assert result.returncode == 0
    assert result.stdout.startswith("ema ")
