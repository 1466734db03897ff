"""The live page at `/`: served with everything it needs from the service itself, and working in
a real headless browser (Debian's chromium, driven by Playwright; no browser is downloaded)."""

import os
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

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


@pytest.mark.timeout(90)
def test_live_page_shows_a_pushed_value_in_a_real_browser(service: ServiceProcess) -> None:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: scripts/test installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    name = "ui.demo"
    stream = f"{service.url}/v1/streams/{name}"
    reference = ReferenceEma(0.5, 0.0)
    assert httpx.put(stream, json={"decay": 0.5, "initial": 0, "history": 100}).status_code == 201
    for value in (3.0, 7.0, 5.0):
        reference.push(value)
        assert httpx.post(f"{stream}/values", json={"value": value}).status_code == 200

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 640})
            page.set_default_timeout(15_000)
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.goto(f"{service.url}/?streams={name}")
            card = page.locator(f'section.card[data-stream="{name}"]')
            card.and_(page.locator('[data-status="live"]')).wait_for()
            # What was pushed before the page opened: from the stream's state and history.
            assert card.locator('[data-field="count"]').inner_text() == "3"
            assert card.locator('[data-field="value"]').inner_text() == shown(reference.shadow)
            assert "decay 0.5" in card.locator(".config").inner_text()
            page.wait_for_function(
                f"document.querySelector('[data-stream=\"{name}\"]').dataset.points === '3'"
            )

            # A push through the API arrives over the event stream.
            reference.push(41.5)
            assert httpx.post(f"{stream}/values", json={"value": 41.5}).status_code == 200
            value = card.locator('[data-field="value"]')
            page.wait_for_function(
                "([element, text]) => element.textContent === text",
                arg=[value.element_handle(), shown(reference.shadow)],
            )
            assert card.locator('[data-field="last"]').inner_text() == "41.5"
            assert card.locator('[data-field="count"]').inner_text() == "4"
            page.wait_for_function(
                f"document.querySelector('[data-stream=\"{name}\"]').dataset.points === '4'"
            )
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "live-page.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
