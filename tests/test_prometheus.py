"""The monitoring files against the real thing: Debian's `prometheus` scraping the service every
second (with API keys on, as in compose), every Grafana dashboard expression and every rule
evaluated through Prometheus' HTTP API; and `promtool test rules`, which proves that each alert
fires and resolves (deploy/prometheus-rules.test.yml)."""

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from app.auth import write_compose_keys
from tests.redis_server import RedisServer, free_port
from tests.service import ServiceProcess
from tests.utils import dashboards, panels, rules

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
RULES = DEPLOY / "prometheus-rules.yml"
RULE_TESTS = DEPLOY / "prometheus-rules.test.yml"
# What Grafana substitutes, with a scrape every second.
GRAFANA_VARIABLES = {"$__rate_interval": "10s", "$__interval": "1s", "$__range": "1m"}


def need(path: str) -> None:
    if not os.path.exists(path):
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: scripts/test installs Debian's prometheus")
        pytest.skip(f"{path} is missing (apt-get install prometheus)")


def as_bool(expr: str) -> str:
    """`expr` with every comparison outside label matchers made a `bool` one: what the alert
    compares, for every series where data exists, instead of only those over the threshold."""
    out, depth, quote, i = [], 0, "", 0
    while i < len(expr):
        char = expr[i]
        if quote:
            quote = "" if char == quote and expr[i - 1] != "\\" else quote
        elif char in "\"'`":
            quote = char
        elif char in "{}":
            depth += 1 if char == "{" else -1
        elif depth == 0 and (match := re.match(r"==|!=|>=|<=|>|<", expr[i:])):
            operator = match[0]
            out.append(operator)
            i += len(operator)
            if not re.match(r"\s*bool\b", expr[i:]):
                out.append(" bool")
            continue
        out.append(char)
        i += 1
    return "".join(out)


def test_as_bool_leaves_label_matchers_alone() -> None:
    assert (
        as_bool('sum(x{a!="b", c=~"d>e"}) / y > 0.5 or up == 0')
        == 'sum(x{a!="b", c=~"d>e"}) / y > bool 0.5 or up == bool 0'
    )
    assert as_bool("a >= bool 1") == "a >= bool 1"


def test_every_alert_fires_and_resolves_in_promtool_unit_tests() -> None:
    need(PROMTOOL)
    checked = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [PROMTOOL, "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=DEPLOY,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Every alert has a case where it fires and a later one where it no longer does.
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    for alert in [rule["alert"] for rule in rules() if "alert" in rule]:
        checks = sorted(
            (_minutes(check["eval_time"]), bool(check["exp_alerts"]))
            for case in cases
            for check in case.get("alert_rule_test", [])
            if check["alertname"] == alert
        )
        fired = [at for at, firing in checks if firing]
        assert fired, f"{alert} never fires in {RULE_TESTS.name}"
        assert any(at > fired[0] and not firing for at, firing in checks), f"{alert} never resolves"
        assert any(at < fired[0] and not firing for at, firing in checks), f"{alert} never pending"


def _minutes(duration: str) -> float:
    number, unit = re.fullmatch(r"(\d+)([smh])", duration).groups()  # type: ignore[union-attr]
    return int(number) * {"s": 1 / 60, "m": 1, "h": 60}[unit]


class Prometheus:
    """A real Prometheus on a free port, its data in a temporary folder."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = folder / "prometheus.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={folder / 'prometheus.yml'}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                ],
                stdout=log,
                stderr=log,
            )
        try:
            self.wait(lambda: httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200)
        except BaseException:
            self.stop()
            raise

    def wait(self, ready: Any, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-2000:]
            try:
                if ready():
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"Prometheus: not in {timeout} s\n{self.log.read_text()[-2000:]}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


STREAMS = {
    "loss": {"decay": 0.9, "windows": [{"name": "fast", "decay": 0.5}]},
    "latency": {"halflife": 10, "windows": [{"name": "1m", "halflife": 60}]},
    "requests": {
        "halflife": 60,
        "kind": "rate",
        "windows": [{"name": "1m", "halflife": 60}, {"name": "5m", "halflife": 300}],
    },
}


@pytest.fixture
def scraped(
    tmp_path: Path, redis_server: RedisServer, redis_client: "redis.Redis"
) -> Iterator[Prometheus]:
    """The service with API keys on and every stream exported, pushed to all along, and a
    Prometheus scraping it every second with a read key and evaluating the rules every second."""
    need(PROMETHEUS)
    secrets = tmp_path / "secrets"
    admin = write_compose_keys(secrets)
    service = ServiceProcess(
        tmp_path,
        REDIS_URL=redis_server.url,
        EMA_KEY_PREFIX="test:",
        EMA_WORKERS="1",
        EMA_METRICS_STREAM_PREFIXES="*",
        EMA_API_KEYS_FILE=str(secrets / "api-keys.json"),
    )
    stop = threading.Event()
    pusher = None
    prometheus = None
    try:
        headers = {"Authorization": f"Bearer {admin}"}
        for name, config in STREAMS.items():
            response = httpx.put(f"{service.url}/v1/streams/{name}", json=config, headers=headers)
            assert response.status_code == 201, response.text

        def push() -> None:
            with httpx.Client(base_url=service.url, headers=headers) as http:
                value = 0.0
                while not stop.wait(0.1):
                    value += 1
                    for name in STREAMS:
                        http.post(f"/v1/streams/{name}/values", json={"value": value % 7})

        pusher = threading.Thread(target=push)
        pusher.start()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": "ema",
                    "static_configs": [{"targets": [service.url.removeprefix("http://")]}],
                    "authorization": {
                        "type": "Bearer",
                        "credentials_file": str(secrets / "metrics-key"),
                    },
                },
                # The same target without the key: the service answers 401.
                {
                    "job_name": "ema-without-key",
                    "static_configs": [{"targets": [service.url.removeprefix("http://")]}],
                },
            ],
        }
        prometheus = Prometheus(tmp_path / "prometheus", config)
        # Enough scrapes for rates, and rule evaluations after them.
        prometheus.wait(
            lambda: (
                prometheus.query('count_over_time(up{job="ema"}[1m]) >= 5')
                and prometheus.query("ema:stream_update_interval_seconds")
            )
        )
        yield prometheus
    finally:
        stop.set()
        if pusher is not None:
            pusher.join()
        if prometheus is not None:
            prometheus.stop()
        service.kill()


def substitute(expr: str, stream: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr.replace("$stream", stream)


@pytest.mark.timeout(120)
def test_dashboard_and_rules_evaluate_on_a_real_prometheus(scraped: Prometheus) -> None:
    prometheus = scraped
    up = prometheus.query('up{job="ema"}')
    assert [sample["value"][1] for sample in up] == ["1"], "the scrape with the read key failed"
    # A scrape refused with 401 is a failed scrape: up is 0, what EmaServiceDown fires on (with
    # job="ema"; its promtool test shows it firing).
    refused = prometheus.query('up{job="ema-without-key"}')
    assert [sample["value"][1] for sample in refused] == ["0"]
    targets = httpx.get(f"{prometheus.url}/api/v1/targets").json()["data"]["activeTargets"]
    errors = {t["labels"]["job"]: t["lastError"] for t in targets}
    assert "401" in errors["ema-without-key"], errors
    assert errors["ema"] == ""

    # The stream picker lists every stream.
    labels = httpx.get(
        f"{prometheus.url}/api/v1/label/stream/values", params={"match[]": "ema_stream_value"}
    ).json()["data"]
    assert set(labels) == set(STREAMS)

    for name, dashboard in dashboards().items():
        annotations = dashboard.get("annotations", {}).get("list", [])
        for annotation in annotations:
            prometheus.query(annotation["expr"])  # valid; empty while no alert fires
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                where = f"{name}: {panel['title']}: {target['expr']}"
                # With every stream chosen (the picker's All), data exists for every target.
                assert prometheus.query(substitute(target["expr"], ".*")), where
                if panel.get("repeat") == "stream" and target["refId"] == "A":
                    # The main value, on each stream's own panel, whatever its kind.
                    for stream in STREAMS:
                        found = prometheus.query(substitute(target["expr"], stream))
                        assert len(found) == 1, (where, stream, found)

    # Rules: loaded, evaluated without error, and what each compares has data.
    groups = httpx.get(f"{prometheus.url}/api/v1/rules").json()["data"]["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    for rule in rules():
        name = rule.get("alert") or rule["record"]
        assert loaded[name]["health"] == "ok", (name, loaded[name].get("lastError"))
        assert prometheus.query(as_bool(rule["expr"])), f"{name}: no data for {rule['expr']}"
    firing = prometheus.query('ALERTS{alertstate="firing"}')
    assert firing == [], json.dumps(firing)
