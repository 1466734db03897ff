"""The `ema` command through its installed entry point, in subprocesses, against the real
service: every command, human and JSON output, where the address and key come from, `watch`
bounded in time and in updates, `serve`, and errors as one line with a non-zero status."""

import json
import math
import os
import pty
import re
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
from ema_client.cli import NAME_RULE as CLI_NAME_RULE

from app.keys import NAME_RULE
from tests.redis_server import RedisServer, free_port
from tests.service import ServiceProcess
from tests.utils import FAST, Proxy, needs_events, read_terminal

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
    assert "  kind        mean" in shown
    assert "  arithmetic  float64" in shown
    with Client(service.url) as ema:
        state = ema.get(name)
    assert state.std is not None
    assert state.z is not None
    assert f"  std         {state.std!r}" in shown
    assert f"  z           {state.z!r}" in shown

    run("push", f"{name}.b", "1", "2", "3", url=service.url)
    table = run("ls", "--prefix", name, url=service.url).stdout.splitlines()
    assert [line.split()[:4] for line in table] == [
        ["NAME", "KIND", "VALUE", "COUNT"],
        [name, "mean", "4.60945", "3"],
        [f"{name}.b", "mean", "1.0299", "3"],  # 1, 0.99 * 1 + 0.01 * 2, 0.99 * 1.01 + 0.01 * 3
    ]
    assert all(re.search(r"  \d+s ago$", line) for line in table[1:]), table
    assert run("rm", name, f"{name}.b", url=service.url).stdout == (
        f"deleted {name}\ndeleted {name}.b\n"
    )
    assert_one_line_error(run("get", name, url=service.url), 1, f"stream '{name}' does not exist")


def test_json_output_anywhere_on_the_line(service: ServiceProcess, name: str) -> None:
    pushed = json.loads(run("--json", "push", name, "5", url=service.url).stdout)
    assert (pushed["name"], pushed["value"], pushed["count"]) == (name, 5.0, 1)
    state = json.loads(run("get", name, "--json", url=service.url).stdout)
    assert state == pushed
    listed = json.loads(run("ls", "--prefix", name, "--json", url=service.url).stdout)
    assert listed == [state]
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
    (("create", "cpu"), "one of the arguments --decay --halflife is required"),
    (("create", "cpu", "--decay", "0.9", "--halflife", "6"), "not allowed with argument"),
    (("create", "cpu", "--halflife", "6", "--window", "1m"), "expected NAME:decay=D or"),
    (("create", "cpu", "--halflife", "6", "--window", "1m:halflife=x"), "'x' is not a number"),
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
        (("push", "no spaces", "1"), "'no spaces' is not a valid stream name: a name is 1 to"),
        (("get", "a/b"), "'a/b' is not a valid stream name"),
        (("rm", "b c"), "'b c' is not a valid stream name"),
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
    it stops by itself; returns what it printed: exactly 3 readings."""
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
    assert len(lines) == 3
    counts = [line["count"] for line in lines]
    assert counts[0] == 0
    assert counts == sorted(set(counts))  # a line per change, none repeated
    for line in lines:  # pushes of 8 from 0 with decay 0.5: 4, 6, 7, ...
        assert (line["name"], line["value"]) == (name, 8 * (1 - 0.5 ** line["count"]))
    return lines


def test_watch_polls_until_count_readings(service: ServiceProcess, name: str) -> None:
    watch_pushes(service, name, "--poll", "--interval", "0.05")


@needs_events
def test_watch_follows_events_until_count_readings(service: ServiceProcess, name: str) -> None:
    watch_pushes(service, name)


def test_watch_stops_after_its_duration(service: ServiceProcess, name: str) -> None:
    with Client(service.url) as ema:
        ema.push(name, 3)
    started = time.monotonic()
    # Long enough for the first read on a loaded machine.
    result = run("watch", name, "--duration", "2", "--interval", "0.1", url=service.url)
    assert result.returncode == 0, result.stderr
    assert 2 <= time.monotonic() - started < 15
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


def test_the_name_rule_is_the_services() -> None:
    assert CLI_NAME_RULE == NAME_RULE


def test_create_takes_every_configuration_field(service: ServiceProcess, name: str) -> None:
    rate = run(
        *("create", name, "--halflife", "10", "--kind", "rate", "--late", "reject"),
        *("--window", "1m:halflife=60", "--window", "5m:halflife=300"),
        *("--ttl", "3600", "--history", "5", "--json"),
        url=service.url,
    )
    assert rate.returncode == 0, rate.stderr
    expected = {
        "halflife": 10.0,
        "decay": None,
        "kind": "rate",
        "late": "reject",
        "windows": [
            {"name": "1m", "decay": None, "halflife": 60.0},
            {"name": "5m", "decay": None, "halflife": 300.0},
        ],
        "ttl": 3600,
        "history": 5,
    }
    config = json.loads(rate.stdout)["config"]
    assert {key: config[key] for key in expected} == expected

    shown = run("get", name, url=service.url).stdout.splitlines()
    assert "  kind        rate (events/s)" in shown
    assert "  config      halflife 10 s" in shown
    assert "  windows     1m  -  halflife 60 s" in shown
    assert "              5m  -  halflife 300 s" in shown
    assert "  retention   late reject, ttl 3600 s, history 5" in shown

    decay = run(
        *("create", f"{name}.d", "--decay", "0.9", "--initial", "1", "--auto-num-updates"),
        *("--arithmetic", "tensorflow-float32"),
        *("--window", "fast:decay=0.5", "--set", "history=3", "--json"),
        url=service.url,
    )
    assert decay.returncode == 0, decay.stderr
    config = json.loads(decay.stdout)["config"]
    assert (config["decay"], config["initial"], config["auto_num_updates"]) == (0.9, 1.0, True)
    assert config["arithmetic"] == "tensorflow-float32"
    assert (config["windows"], config["history"]) == (
        [{"name": "fast", "decay": 0.5, "halflife": None}],
        3,
    )
    refused = run("create", f"{name}.x", "--decay", "0.9", "--set", "nonsense=1", url=service.url)
    assert_one_line_error(refused, 1, "nonsense")


def test_ls_is_a_table_with_each_kind(service: ServiceProcess, name: str) -> None:
    with Client(service.url) as ema:
        ema.create(f"{name}.r", halflife=60, kind="rate")
        ema.push_many(f"{name}.r", [3, 1, 4])
        ema.create(f"{name}.m", decay=0.5, initial=0)
    header, mean, rate = run("ls", "--prefix", name, url=service.url).stdout.splitlines()
    assert header.split() == ["NAME", "KIND", "VALUE", "COUNT", "UPDATED"]
    assert mean.split() == [f"{name}.m", "mean", "0", "0", "never"]
    rate_name, kind, value, count, *updated = rate.split()
    assert (rate_name, kind, count) == (f"{name}.r", "rate", "3")
    # 8 events weighed by ln 2 / 60 at most: a rate in events per second, falling since.
    assert value.endswith("/s")
    assert 0 < float(value.removesuffix("/s")) <= 8 * math.log(2) / 60
    assert re.fullmatch(r"\d+s ago", " ".join(updated))
    # Columns line up: each starts where its heading does.
    assert mean.index("mean") == rate.index("rate") == header.index("KIND")
    assert run("ls", "--prefix", f"{name}.none", url=service.url).stdout == ""


def test_url_may_be_host_and_port_and_configuration_errors_are_not_retried(
    service: ServiceProcess, name: str
) -> None:
    run("push", name, "1", url=service.url)
    bare = run("get", name, "--url", f"127.0.0.1:{service.port}", url=None)
    assert bare.returncode == 0, bare.stderr
    assert bare.stdout.startswith(f"{name}\n")
    assert_one_line_error(run("get", name, url="ftp://x"), 1, "invalid service URL 'ftp://x'")
    proxy = Proxy(service.port)
    try:
        bad_key = run("get", name, "--api-key", "two words", url=proxy.url)
        assert_one_line_error(bad_key, 1, "the API key has characters a header cannot carry")
        assert proxy.requests() == []  # refused before sending anything, once
    finally:
        proxy.close()


@needs_events
def test_watch_marks_a_disconnection_and_reconnects(
    redis_server: RedisServer, tmp_path: Path, name: str
) -> None:
    env = {"REDIS_URL": redis_server.url, "EMA_KEY_PREFIX": "cli-drop:", "EMA_WORKERS": "1"}
    with ServiceProcess(tmp_path, **env) as first_run:
        with Client(first_run.url, retry=FAST) as ema:
            ema.create(name, decay=0.5, initial=0)
        with watch(
            name, "--json", "--count", "3", "--duration", "60", url=first_run.url
        ) as process:
            try:
                assert process.stdout is not None
                first = json.loads(process.stdout.readline())
                with Client(first_run.url, retry=FAST) as ema:
                    ema.push(name, 8)
                second = json.loads(process.stdout.readline())
                first_run.kill()  # a crash: the event stream drops at once
                # The same port, the same Redis.
                with ServiceProcess(tmp_path, port=first_run.port, **env) as second_run:
                    with Client(second_run.url, retry=FAST) as ema:
                        ema.push(name, 8)
                    rest, errors = process.communicate(timeout=30)
            finally:
                process.kill()
    assert process.returncode == 0, errors
    third = json.loads(rest)
    assert [line["count"] for line in (first, second, third)] == [0, 1, 2]
    assert third["value"] == 6.0
    told = errors.splitlines()
    assert told[0].startswith("ema: disconnected (")
    assert told[0].endswith("; reconnecting")
    assert told[-1] == "ema: reconnected"
    assert len(told) == 2  # once per outage, however many attempts


def test_watch_decays_a_rate_to_now_on_a_terminal(service: ServiceProcess, name: str) -> None:
    with Client(service.url) as ema:
        ema.create(name, halflife=1, kind="rate")
        ema.push_many(name, [10, 10])
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [str(EMA), "watch", name, "--duration", "2"],
        env=environment(EMA_URL=service.url),
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    try:
        output = read_terminal(controller)  # until the watch ends and its terminal closes
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    frames = [f for f in output.decode().split("\r\x1b[2K") if f.strip()]
    values = [float(re.match(rf"{re.escape(name)}  (\S+)/s  ", f)[1]) for f in frames]  # type: ignore[index]
    # One reading, then the same line redrawn as the rate decays with a halflife of 1 s.
    assert len(values) >= 4
    assert values == sorted(values, reverse=True)
    assert len(set(values)) == len(values)
    assert values[-1] < values[0] / 2
