"""The compose `monitoring` profile: Prometheus scrapes the app, Grafana shows a provisioned
dashboard, and every metric their files name is one that a real scrape of the service exposes.

Docker is not needed: the files are parsed (YAML, JSON) and the PromQL expressions are read by the
small tokenizer below, which only needs to find metric names.
"""

import re
from collections.abc import Iterator

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.redis_server import RedisServer
from tests.utils import (
    ROOT,
    container_file,
    dashboards,
    make_settings,
    mounts,
    panels,
    prometheus_config,
    provisioning,
    rules,
    serve,
    service,
)

MONITORING = ("prometheus", "grafana")

# Series each metric type puts in the text format, after the family's name.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}


@pytest.fixture(scope="module")
def exposed(redis_server: RedisServer) -> dict[str, str]:
    """Every series name a scrape of the service carries, mapped to its family's name."""
    import anyio

    async def scrape() -> str:
        with redis_server.client() as client:
            client.flushall()
        settings = make_settings(redis_server.url, metrics_stream_prefixes="*")
        async for client in serve(settings):
            await client.post("/v1/streams/cpu/values", json={"value": 1.0})
            response = await client.get("/metrics")
            assert response.status_code == 200
            return response.text
        raise AssertionError("unreachable")

    text = anyio.run(scrape)
    families = list(text_string_to_metric_families(text))
    types = {family.name: family.type for family in families}
    names: dict[str, str] = {}
    for family in families:
        # The text format gives a counter's or histogram's `_created` series a family of its own.
        base = family.name.removesuffix("_created")
        owner = base if base != family.name and base in types else family.name
        for suffix in SUFFIXES.get(family.type, ("",)):
            names[family.name + suffix] = owner
        for sample in family.samples:
            names[sample.name] = owner
    return names


# --- PromQL -----------------------------------------------------------------------------------

_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
_KEYWORDS |= {"group_left", "group_right"}
_IDENTIFIER = re.compile(r"(?<![\w:$.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label_values(m, label) included)."""
    if match := re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)\s*", expr):
        return {match[1]}
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    text = _GROUPING.sub("", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        if match[2] is None and match[1].lower() not in _KEYWORDS:
            names.add(match[1])
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'sum by (le, route) (rate(ema_x_bucket{a="b",c=~"d|e"}[$__rate_interval]))',
            {"ema_x_bucket"},
        ),
        ("a_total / on (job) group_left b > bool 0.5", {"a_total", "b"}),
        ('histogram_quantile(0.99, sum(rate(h_bucket{s="x(y)"}[5m]))) > 1e-3', {"h_bucket"}),
        ("label_values(ema_stream_value, stream)", {"ema_stream_value"}),
        ("max(up) == 1", {"up"}),
    ],
)
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


# --- compose ----------------------------------------------------------------------------------


def test_monitoring_services_run_only_in_their_profile_with_pinned_images() -> None:
    for name in MONITORING:
        definition = service(name)
        assert definition.get("profiles") == ["monitoring"], name
        image = definition["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name}: {image} is not pinned"
    # The service itself and its Redis run without the profile.
    assert "profiles" not in service("app")
    assert "profiles" not in service("redis")
    for target, source in mounts("prometheus").items() | mounts("grafana").items():
        assert (ROOT / source).exists(), f"{source} (mounted at {target}) is missing"


@pytest.mark.anyio
async def test_prometheus_scrapes_the_app_where_it_serves_metrics(
    redis_server: RedisServer, redis_client: "redis.Redis"
) -> None:
    jobs = prometheus_config()["scrape_configs"]
    targets = [
        (job.get("metrics_path", "/metrics"), target)
        for job in jobs
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert len(targets) == 1, targets
    path, target = targets[0]
    host, port = target.rsplit(":", 1)
    assert host == "app"
    # The port the app listens on in its container (the image's EMA_PORT) and publishes.
    published = [str(entry).rsplit(":", 1)[-1] for entry in service("app")["ports"]]
    assert port in published
    async for client in serve(make_settings(redis_server.url)):
        response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")


def rule_expressions() -> Iterator[tuple[str, str]]:
    for rule in rules():
        yield rule.get("alert") or rule["record"], rule["expr"]


def known_series(exposed: dict[str, str]) -> set[str]:
    """What the service exposes, what Prometheus makes itself (`up` for every target, `ALERTS`)
    and what the rule files record."""
    return exposed.keys() | {"up", "ALERTS"} | {r["record"] for r in rules() if "record" in r}


def test_prometheus_rules_use_only_metrics_the_service_exposes(exposed: dict[str, str]) -> None:
    expressions = list(rule_expressions())
    assert expressions, "no rules loaded"
    known = known_series(exposed)
    for name, expr in expressions:
        used = metric_names(expr)
        assert used, f"{name}: no metric in {expr!r}"
        assert used <= known, f"{name}: {sorted(used - known)} not exposed"


def test_every_alert_says_what_and_where_its_runbook_is() -> None:
    readme = (ROOT / "README.md").read_text()
    alerts = [rule for rule in rules() if "alert" in rule]
    assert {
        "EmaServiceDown",
        "EmaRedisErrors",
        "EmaHighErrorRatio",
        "EmaSlowPushScript",
        "EmaStreamStale",
        "EmaStreamUnusualValue",
    } <= {rule["alert"] for rule in alerts}
    for rule in alerts:
        name = rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), name
        assert len(annotations["description"]) > len(annotations["summary"]), name
        assert annotations["runbook"] == f"README.md#{name.lower()}"
        assert re.search(rf"^#### {name}$", readme, re.MULTILINE), f"README: no runbook for {name}"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name


# --- Grafana ----------------------------------------------------------------------------------


def test_grafana_reads_the_prometheus_of_the_profile() -> None:
    sources = [source for doc in provisioning("datasources") for source in doc["datasources"]]
    assert [s["type"] for s in sources] == ["prometheus"]
    url = httpx.URL(sources[0]["url"])
    assert url.host == "prometheus"
    listen = "9090"  # Prometheus' default --web.listen-address
    assert url.port == int(listen)
    home = service("grafana")["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert container_file("grafana", home).name in dashboards()


def test_dashboard_shows_every_family_and_nothing_the_service_lacks(
    exposed: dict[str, str],
) -> None:
    known = known_series(exposed)
    uids = {s["uid"] for doc in provisioning("datasources") for s in doc["datasources"]}
    shown: set[str] = set()
    for name, dashboard in dashboards().items():
        queries = [
            (panel["title"], target["expr"], target.get("datasource") or panel.get("datasource"))
            for panel in panels(dashboard)
            for target in panel.get("targets", [])
        ]
        for variable in dashboard.get("templating", {}).get("list", []):
            query = variable.get("query")
            expr = query.get("query") if isinstance(query, dict) else query
            queries.append((f"${variable['name']}", expr, variable.get("datasource")))
        assert queries, f"{name} has no queries"
        for title, expr, datasource in queries:
            used = metric_names(expr)
            assert used, f"{name}: {title}: no metric in {expr!r}"
            assert used <= known, f"{name}: {title}: {sorted(used - known)}"
            assert datasource, f"{name}: {title}: no data source"
            assert datasource["uid"] in uids, f"{name}: {title}: {datasource}"
            shown |= {exposed[metric] for metric in used if metric in exposed}
    # Every family the service exposes is on a dashboard: the service's and the streams'.
    assert shown == set(exposed.values())
