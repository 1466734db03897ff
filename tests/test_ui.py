"""The live page at `/`: served with everything it needs from the service itself, and working in
a real headless browser (Debian's chromium, driven by Playwright; no browser is downloaded)."""

import os
import re
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.redis_server import RedisServer
from tests.reference import ReferenceEma
from tests.service import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class References(HTMLParser):
    """Every src and href in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found += [value for name, value in attrs if name in ("src", "href") and value]


@pytest.fixture
def service(
    tmp_path: Path, redis_server: RedisServer, redis_client: "redis.Redis"
) -> Iterator[ServiceProcess]:
    env = {"REDIS_URL": redis_server.url, "EMA_KEY_PREFIX": "test:", "EMA_WORKERS": "1"}
    process = ServiceProcess(tmp_path, **env)
    yield process
    process.kill()


def test_page_and_everything_it_loads_come_from_the_service(service: ServiceProcess) -> None:
    page = httpx.get(f"{service.url}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    parser = References()
    parser.feed(page.text)
    local = [ref for ref in parser.found if ref.startswith("/")]
    # Offline: nothing from another host (a data: URL is the empty favicon).
    assert sorted(set(parser.found) - set(local)) == ["data:,"]
    assert {"/static/app.js", "/static/style.css"} <= set(local)
    for ref in local:
        response = httpx.get(f"{service.url}{ref}")
        assert response.status_code == 200, ref
    script = httpx.get(f"{service.url}/static/app.js")
    assert script.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert re.search(r"https?://", script.text) is None


def test_vendored_chart_library_is_pinned_and_licensed() -> None:
    vendor = ROOT / "app" / "static" / "vendor"
    page = (ROOT / "app" / "static" / "index.html").read_text()
    versions = set(re.findall(r"/static/vendor/uplot-(\d+\.\d+\.\d+)\.min\.(?:js|css)", page))
    assert len(versions) == 1, versions
    version = versions.pop()
    assert f"uPlot (v{version})" in (vendor / f"uplot-{version}.min.js").read_text()
    assert (vendor / f"uplot-{version}.min.css").is_file()
    assert "MIT License" in (vendor / "uplot-LICENSE").read_text()


def shown(x: float) -> str:
    """How the page prints a number: six significant digits, no trailing zeros."""
    return f"{x:.6g}"


def need_chromium() -> None:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: scripts/test installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")


class Browser:
    """Debian's chromium through Playwright, collecting console errors and screenshots."""

    def __init__(self, playwright: Any) -> None:
        self.browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        self.problems: list[str] = []

    def page(self, width: int, height: int = 800) -> Any:
        page = self.browser.new_page(viewport={"width": width, "height": height})
        page.set_default_timeout(15_000)
        page.on("console", lambda m: self.problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda error: self.problems.append(str(error)))
        return page

    def close(self) -> None:
        self.browser.close()


def screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def no_horizontal_overflow(page: Any) -> None:
    widths = page.evaluate(
        "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    assert widths[0] <= widths[1], f"content {widths[0]} px wide in a {widths[1]} px window"


def text_is(page: Any, locator: Any, expected: str) -> None:
    page.wait_for_function(
        "([element, text]) => element.textContent === text",
        arg=[locator.element_handle(), expected],
    )


def number(locator: Any) -> float:
    return float(locator.get_attribute("data-value"))


STREAMS: dict[str, dict[str, Any]] = {
    "ui.loss": {
        "decay": 0.5,
        "initial": 0,
        "history": 100,
        "windows": [{"name": "slow", "decay": 0.9}],
    },
    "ui.latency": {
        "halflife": 10,
        "history": 100,
        "windows": [{"name": "1m", "halflife": 60}, {"name": "5m", "halflife": 300}],
    },
    # A short halflife: the rate visibly falls within a second while no events come.
    "ui.requests": {
        "halflife": 2,
        "kind": "rate",
        "history": 100,
        "windows": [{"name": "1m", "halflife": 60}],
    },
}


@pytest.mark.timeout(120)
def test_overview_and_detail_of_every_kind_in_a_real_browser(service: ServiceProcess) -> None:
    need_chromium()
    from playwright.sync_api import sync_playwright

    base = service.url
    loss = ReferenceEma(0.5, 0.0)
    slow = ReferenceEma(0.9, None)
    for name, config in STREAMS.items():
        assert httpx.put(f"{base}/v1/streams/{name}", json=config).status_code == 201
    for value in (3.0, 7.0, 5.0):
        loss.push(value)
        slow.push(value)
        assert httpx.post(f"{base}/v1/streams/ui.loss/values", json={"value": value}).is_success
    now = httpx.get(f"{base}/v1/streams/ui.loss").json()["updated_at"]
    # The latency stream: samples with timestamps, a pause of 10 minutes among them (a gap).
    samples = [(now - 900 + i, 20.0 + i) for i in range(5)] + [
        (now - 300 + i, 40.0) for i in range(5)
    ]
    batch = [{"value": x, "timestamp": t} for t, x in samples]
    assert httpx.post(f"{base}/v1/streams/ui.latency/values", json={"values": batch}).is_success
    rate = httpx.post(f"{base}/v1/streams/ui.requests/values", json={"values": [4, 6]}).json()
    # More streams, without history, for paging: 30 of them.
    bulk = [{"stream": f"pg.{i:02}", "value": float(i)} for i in range(30)]
    assert httpx.post(f"{base}/v1/values", json={"entries": bulk}).json()["failed"] == 0
    latency = httpx.get(f"{base}/v1/streams/ui.latency").json()

    with sync_playwright() as playwright:
        browser = Browser(playwright)
        try:
            page = browser.page(1200)
            page.goto(f"{base}/?prefix=ui.")
            rows = page.locator(".row")
            page.wait_for_function("document.querySelectorAll('.row').length === 3")
            assert [r.get_attribute("data-stream") for r in rows.all()] == sorted(STREAMS)
            row = {name: page.locator(f'.row[data-stream="{name}"]') for name in STREAMS}
            assert row["ui.loss"].locator('[data-field="kind"]').inner_text() == "mean"
            assert row["ui.requests"].locator('[data-field="kind"]').inner_text() == "rate"
            assert row["ui.loss"].locator('[data-field="value"]').inner_text() == shown(loss.shadow)
            assert row["ui.latency"].locator('[data-field="value"]').inner_text() == shown(
                latency["value"]
            )
            assert row["ui.requests"].locator('[data-field="value"]').inner_text().endswith("/s")
            config = row["ui.latency"].locator('[data-field="config"]').inner_text()
            assert "halflife 10 s" in config
            assert "1m: halflife 60 s" in config
            assert "5m: halflife 5 min" in config
            assert "decay 0.5" in row["ui.loss"].locator('[data-field="config"]').inner_text()
            assert re.fullmatch(
                r"updated \d+ s ago", row["ui.loss"].locator('[data-field="updated"]').inner_text()
            )
            # Sparklines from history.
            for name in STREAMS:
                page.wait_for_function(
                    f"document.querySelector('.row[data-stream=\"{name}\"] polyline')"
                    ".getAttribute('points').split(' ').length >= 2"
                )
            # The rate decays while idle, on the overview too.
            first = number(row["ui.requests"].locator('[data-field="value"]'))
            page.wait_for_timeout(1200)
            assert number(row["ui.requests"].locator('[data-field="value"]')) < first
            screenshot(page, "overview-wide")

            # Sorted by last update: the latest push first.
            page.select_option("#sort", "updated")
            page.wait_for_function(
                "document.querySelector('.row').dataset.stream === 'ui.requests'"
            )
            # Every stream, paged by 25.
            page.fill("#prefix", "")
            page.wait_for_function("document.querySelector('#overview').dataset.streams === '33'")
            assert page.locator("#page-label").inner_text() == "1\u201325 of 33"
            page.click("#next")
            assert page.locator("#page-label").inner_text() == "26\u201333 of 33"
            assert rows.count() == 8

            # Details: the mean by decay, with the service's numbers.
            page.goto(f"{base}/?prefix=ui.")
            page.locator('.row[data-stream="ui.loss"]').click()
            detail = page.locator("#detail")
            page.wait_for_function("document.querySelector('#detail').dataset.status === 'live'")
            numbers = page.locator("#numbers")
            assert numbers.locator('[data-field="value"]').inner_text() == shown(loss.shadow)
            assert numbers.locator('[data-field="debiased"]').inner_text() == shown(loss.debiased)
            assert numbers.locator('[data-field="count"]').inner_text() == "3"
            assert numbers.locator('[data-field="last"]').inner_text() == "5"
            page.wait_for_function("document.querySelector('#detail').dataset.points === '3'")
            assert detail.locator('[data-field="kind"]').inner_text() == "mean"
            # A push arrives over the event stream, windows and all.
            loss.push(41.5)
            slow.push(41.5)
            assert httpx.post(f"{base}/v1/streams/ui.loss/values", json={"value": 41.5}).is_success
            text_is(page, numbers.locator('[data-field="value"]'), shown(loss.shadow))
            assert numbers.locator('[data-window="slow"]').inner_text() == shown(slow.shadow)
            assert numbers.locator('[data-field="count"]').inner_text() == "4"
            page.wait_for_function("document.querySelector('#detail').dataset.points === '4'")
            # The spread: std and z as the service reports them, and the band on the chart.
            state = httpx.get(f"{base}/v1/streams/ui.loss").json()
            assert state["std"] > 0
            text_is(page, numbers.locator('[data-field="std"]'), shown(state["std"]))
            assert numbers.locator('[data-field="z"]').inner_text() == shown(state["z"])
            legend = page.locator("#chart .u-legend").inner_text()
            assert "value + 2\u03c3" in legend
            assert "value \u2212 2\u03c3" in legend
            screenshot(page, "detail-decay")
            # Replaced by a PUT while watched: the page starts over with it.
            replaced = httpx.put(f"{base}/v1/streams/ui.loss", json=STREAMS["ui.loss"])
            assert replaced.status_code == 200
            text_is(page, numbers.locator('[data-field="count"]'), "0")
            assert numbers.locator('[data-field="value"]').inner_text() == "0"
            assert httpx.post(f"{base}/v1/streams/ui.loss/values", json={"value": 2}).is_success
            text_is(page, numbers.locator('[data-field="count"]'), "1")
            assert numbers.locator('[data-field="value"]').inner_text() == "1"
            page.wait_for_function("document.querySelector('#detail').dataset.points === '1'")

            # The halflife mean: windows shown, and the 10-minute pause in its history a gap.
            page.goto(f"{base}/?stream=ui.latency")
            page.wait_for_function("document.querySelector('#detail').dataset.status === 'live'")
            assert numbers.locator('[data-field="value"]').inner_text() == shown(latency["value"])
            for window in ("1m", "5m"):
                expected = shown(latency["windows"][window]["value"])
                assert numbers.locator(f'[data-window="{window}"]').inner_text() == expected
            page.wait_for_function("document.querySelector('#detail').dataset.points === '10'")
            assert detail.get_attribute("data-gaps") == "1"
            # All of its history (its samples span 604 s); then the last 5 minutes only.
            assert detail.get_attribute("data-span") == "604"
            page.click('button[data-range="300"]')
            page.wait_for_function("document.querySelector('#detail').dataset.span === '300'")
            assert page.locator('button[data-range="300"]').get_attribute("aria-pressed") == "true"
            page.click('button[data-range="all"]')
            screenshot(page, "detail-halflife")

            # The rate: events per second on their own axis, falling while idle.
            page.goto(f"{base}/?stream=ui.requests")
            page.wait_for_function("document.querySelector('#detail').dataset.status === 'live'")
            assert detail.get_attribute("data-kind") == "rate"
            assert "events per second" in detail.locator('[data-field="kind"]').inner_text()
            assert page.locator("#chart .u-axis").count() == 3  # time, events/s, counts
            assert numbers.locator('[data-field="last"]').inner_text() == "6"
            value = numbers.locator('[data-field="value"]')
            started = time.monotonic()
            before, window_before = number(value), number(numbers.locator('[data-window="1m"]'))
            assert 0 < before < rate["value"]
            page.wait_for_timeout(1200)
            after = number(value)
            elapsed = time.monotonic() - started
            assert after < before
            assert number(numbers.locator('[data-window="1m"]')) < window_before
            # By its own halflife (2 s): each number shown was computed at the page's last tick,
            # at most TICK_MS (0.5 s) before it was read (and reading takes a moment).
            assert 2 ** (-(elapsed + 0.75) / 2) <= after / before <= 2 ** (-(elapsed - 0.75) / 2)
            screenshot(page, "detail-rate")

            # 390 px wide: nothing overflows, on the overview and on a detail.
            narrow = browser.page(390)
            narrow.goto(f"{base}/?prefix=ui.")
            narrow.wait_for_function("document.querySelectorAll('.row').length === 3")
            no_horizontal_overflow(narrow)
            screenshot(narrow, "overview-390")
            for name in STREAMS:
                narrow.goto(f"{base}/?stream={name}")
                narrow.wait_for_function(
                    "document.querySelector('#detail').dataset.status === 'live'"
                )
                no_horizontal_overflow(narrow)
            screenshot(narrow, "detail-rate-390")

            # The service goes away: the detail says so, and the outage will be a gap.
            gaps = int(detail.get_attribute("data-gaps") or "0")
            service.kill()
            page.wait_for_function("document.querySelector('#detail').dataset.status === 'waiting'")
            assert "disconnected" in detail.locator('[data-field="status"]').inner_text()
            page.wait_for_function(
                f"Number(document.querySelector('#detail').dataset.gaps) > {gaps}"
            )
            screenshot(page, "detail-disconnected")
        finally:
            browser.close()
    assert browser.problems == [] or all(
        "Failed to load resource" in problem or "ERR_CONNECTION_REFUSED" in problem
        for problem in browser.problems
    ), browser.problems


@pytest.mark.timeout(90)
def test_the_api_key_flow_in_a_real_browser(
    tmp_path: Path, redis_server: RedisServer, redis_client: "redis.Redis"
) -> None:
    need_chromium()
    from playwright.sync_api import sync_playwright

    from app.auth import write_compose_keys

    admin = write_compose_keys(tmp_path / "secrets")
    reader = (tmp_path / "secrets" / "metrics-key").read_text()
    service = ServiceProcess(
        tmp_path,
        REDIS_URL=redis_server.url,
        EMA_KEY_PREFIX="test:",
        EMA_WORKERS="1",
        EMA_API_KEYS_FILE=str(tmp_path / "secrets" / "api-keys.json"),
    )
    try:
        pushed = httpx.post(
            f"{service.url}/v1/streams/cpu/values",
            json={"value": 2.5},
            headers={"Authorization": f"Bearer {admin}"},
        )
        assert pushed.is_success
        with sync_playwright() as playwright:
            browser = Browser(playwright)
            try:
                page = browser.page(390)
                page.goto(f"{service.url}/")
                panel = page.locator("#key-panel")
                panel.wait_for()
                # The service's own words, not an HTTP status text.
                assert "a valid API key is required" in page.locator("#message").inner_text()
                assert "a valid API key is required" in page.locator("#key-why").inner_text()
                assert page.locator("#key-button").inner_text() == "API key: none"
                assert "until the service answers" in page.locator("#rows").inner_text()
                no_horizontal_overflow(page)
                screenshot(page, "api-key-asked")
                page.fill("#key", reader)
                page.click("#key-panel button[type=submit]")
                page.locator('.row[data-stream="cpu"]').wait_for()
                assert page.locator("#key-button").inner_text() == "API key: set"
                assert panel.is_hidden()
                assert page.locator("#message").is_hidden()
                value = page.locator('.row[data-stream="cpu"] [data-field="value"]')
                assert value.inner_text() == "2.5"
            finally:
                browser.close()
        assert all("401" in problem for problem in browser.problems), browser.problems
    finally:
        service.kill()


@pytest.mark.timeout(90)
def test_a_redis_outage_is_shown_in_the_services_words(tmp_path: Path) -> None:
    need_chromium()
    from playwright.sync_api import sync_playwright

    redis_server = RedisServer(tmp_path / "redis").start()
    service = ServiceProcess(
        tmp_path, REDIS_URL=redis_server.url, EMA_KEY_PREFIX="test:", EMA_WORKERS="1"
    )
    try:
        assert httpx.post(f"{service.url}/v1/streams/cpu/values", json={"value": 1.5}).is_success
        with sync_playwright() as playwright:
            browser = Browser(playwright)
            try:
                page = browser.page(390)
                page.goto(f"{service.url}/")
                page.locator('.row[data-stream="cpu"]').wait_for()
                redis_server.kill()
                page.wait_for_function(
                    "document.querySelector('#overview').dataset.status === 'failing'"
                )
                # The service's problem+json detail, with its status and title.
                shown = page.locator("#message").inner_text()
                assert "Redis is unavailable" in shown
                assert "(503 Service Unavailable)" in shown
                assert "stale" in (page.locator(".row").get_attribute("class") or "")
                no_horizontal_overflow(page)
                screenshot(page, "overview-redis-down")
                redis_server.start()  # empty: it was killed before it saved anything
                pushed = httpx.post(f"{service.url}/v1/streams/cpu/values", json={"value": 1.5})
                assert pushed.is_success
                page.wait_for_function(
                    "document.querySelector('#overview').dataset.status === 'live'"
                )
                assert page.locator("#message").is_hidden()
                assert page.locator(
                    '.row[data-stream="cpu"] [data-field="value"]'
                ).inner_text() == ("1.5")
            finally:
                browser.close()
    finally:
        service.kill()
        redis_server.kill()
