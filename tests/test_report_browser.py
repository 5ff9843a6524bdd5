"""The HTML reports in a real headless Chromium: they render, show their plots, log no error, load within 2 s."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from service.planning.catalog import Catalog
from service.reporting import render_fleet_report, render_plan_report
from tests.test_reporting import XSS, fleet_spec_counts, run_plan, small_plan_spec

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Request

MAX_LOAD_S = 2.0


def _unavailable(reason: str) -> NoReturn:
    """Skip on a developer's machine; in CI a missing browser is a failure, never a silent skip."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the browser test: .ci/run installs Debian's chromium)")
    pytest.skip(reason)


def _chromium_path() -> str:
    path = os.environ.get("SPLAN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None or not Path(path).is_file():
        _unavailable(f"no Chromium found at {path} (apt-get install chromium, or set SPLAN_CHROMIUM)")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    executable = _chromium_path()
    with sync_playwright() as playwright:
        # Debian's Chromium, not a Playwright download: nothing outside the package registries is reachable.
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def planned(catalog: Catalog) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = small_plan_spec()
    return spec, run_plan(spec, catalog)


@dataclass
class Visit:
    """A page opened from a file, with what it logged and fetched."""

    page: Page
    load_s: float
    navigation_ms: float
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


def visit(browser: Browser, path: Path, *, errors: list[str], requests: list[str]) -> Visit:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})

    def on_console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            errors.append(f"{message.type}: {message.text}")

    def on_request(request: Request) -> None:
        if not request.url.startswith(("file:", "data:")):
            requests.append(request.url)

    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("request", on_request)
    started = time.perf_counter()
    page.goto(path.resolve().as_uri(), wait_until="load")
    load_s = time.perf_counter() - started
    navigation_ms: Any = page.evaluate("() => performance.getEntriesByType('navigation')[0].loadEventEnd")
    return Visit(page, load_s, float(navigation_ms), errors, requests)


def visible_svgs(page: Page) -> int:
    """Inline plots laid out at a readable size (a hidden or collapsed one measures 0)."""
    count: Any = page.locator("svg").evaluate_all(
        "els => els.filter(e => { const r = e.getBoundingClientRect(); return r.width > 200 && r.height > 80; }).length"
    )
    return int(count)


def assert_clean(seen: Visit) -> None:
    assert seen.errors == []
    assert seen.requests == []
    assert seen.navigation_ms <= MAX_LOAD_S * 1000
    assert seen.load_s <= MAX_LOAD_S


def test_the_plan_report_renders_in_chromium(
    browser: Browser, planned: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path
) -> None:
    spec, result = planned
    path = tmp_path / "plan.html"
    path.write_text(render_plan_report(spec, result), encoding="utf-8")
    seen = visit(browser, path, errors=[], requests=[])
    page = seen.page
    assert page.title() == "Serving plan: llama-3.1-70b on h100-sxm"
    assert page.locator("h1").inner_text() == "Serving plan: llama-3.1-70b on h100-sxm"
    assert visible_svgs(page) == 5
    assert page.locator("table.strategies tbody tr").count() == len(result["strategies"])
    assert page.locator("#why-winner").inner_text().startswith(result["strategies"][0]["label"] + " wins")
    # The pruned list is collapsed until its summary is clicked.
    rows = page.locator("table.rejected tbody tr")
    assert not rows.first.is_visible()
    page.locator("#rejected-list summary").click()
    assert rows.count() == len(result["rejected"])
    assert rows.first.is_visible()
    page.screenshot(path=str(tmp_path / "plan.png"), full_page=True)
    assert (tmp_path / "plan.png").stat().st_size > 10_000
    assert_clean(seen)
    page.close()


def test_markup_in_a_spec_is_shown_as_text_not_run(
    browser: Browser, planned: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path
) -> None:
    spec, result = planned
    path = tmp_path / "hostile.html"
    hostile = "<script>window.pwned = 1</script><img src=x onerror='window.pwned = 2'>"
    path.write_text(render_plan_report({**spec, "model": hostile}, result, title=f"plan {XSS}"), encoding="utf-8")
    seen = visit(browser, path, errors=[], requests=[])
    assert seen.page.evaluate("() => window.pwned === undefined")
    assert seen.page.locator("h1").inner_text() == f"plan {XSS}"
    assert seen.page.locator("#spec td").first.inner_text() == hostile
    assert_clean(seen)
    seen.page.close()


def test_the_fleet_report_renders_in_chromium(browser: Browser, catalog: Catalog, tmp_path: Path) -> None:
    from service.placement.fleet_plan import parse_fleet_spec, plan_fleet

    spec = fleet_spec_counts()
    result = plan_fleet(parse_fleet_spec(spec), catalog=catalog, now_s=0.0)
    path = tmp_path / "fleet.html"
    path.write_text(render_fleet_report(spec, result), encoding="utf-8")
    seen = visit(browser, path, errors=[], requests=[])
    page = seen.page
    assert page.locator("h1").inner_text() == "Fleet plan: 3 deployments"
    assert visible_svgs(page) == 1
    assert page.locator("table.deployments tbody tr").count() == len(spec["deployments"])
    assert page.locator("table.deployments tbody tr").first.locator("td").first.inner_text() == f"chat-8b {XSS}"
    assert_clean(seen)
    page.close()
