"""Issue 13 targets: each example's HTML report (size, load time in headless Chromium) and its launch files.

Usage: python -m bench.report_and_launch [--chromium PATH] [--out DIR]
Plans every strategy example in examples/ with its own search (as `splan plan` does), renders the report, opens it in
Debian's Chromium through Playwright (load time from the Navigation Timing entry and the wall clock around `goto`),
then emits launch files for the top three strategies on vLLM, SGLang and TRT-LLM and checks every flag and TRT-LLM
YAML key against the engine argument names in service/launch/data (the check tests/test_launch.py runs).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from service.catalog.loader import default_catalog
from service.launch import ENGINES, launch_bundle
from service.planning.plan_spec import parse_plan_spec
from service.planning.search import plan
from service.reporting import render_plan_report
from tests.test_launch import all_problems
from tests.test_report_browser import visit

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TOP_STRATEGIES = 3


def _strategy_examples() -> list[Path]:
    out = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if isinstance(doc, dict) and "deployments" not in doc and "servers" not in doc:
            out.append(path)
    return out


def main() -> int:
    """Print one row per example with every figure the targets name."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="splan-reports-")))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    catalog = default_catalog()
    args.out.mkdir(parents=True, exist_ok=True)
    header = (
        f"{'example':24s} {'plan s':>7s} {'render s':>8s} {'size KB':>8s} {'load ms':>8s} {'wall ms':>8s} "
        f"{'svg':>4s} {'errors':>6s} {'fetches':>7s} {'launch sets':>11s} {'flags checked':>13s} {'problems':>8s}"
    )
    print(header)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, headless=True)
        for path in _strategy_examples():
            raw: dict[str, Any] = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "kind"}
            started = time.perf_counter()
            request = parse_plan_spec(raw, catalog=catalog, base_dir=path.parent)
            result = plan(request, catalog=catalog).as_dict()
            plan_s = time.perf_counter() - started
            started = time.perf_counter()
            page_html = render_plan_report(raw, result)
            render_s = time.perf_counter() - started
            report = args.out / f"{path.stem}.html"
            report.write_text(page_html, encoding="utf-8")
            seen = visit(browser, report, errors=[], requests=[])
            page = seen.page
            wall_ms, load_ms = seen.load_s * 1e3, seen.navigation_ms
            svgs = int(page.locator("svg").count())
            page.close()
            sets = flags = problems = 0
            for rank in range(1, min(TOP_STRATEGIES, len(result["strategies"])) + 1):
                bundle = launch_bundle(raw, result, strategy_rank=rank, catalog=catalog)
                found = all_problems(bundle)
                sets += len(ENGINES)
                flags += sum(text.count(" --") for p, text in bundle.items() if p.endswith(".sh"))
                problems += len(found)
                for problem in found:
                    print(f"  {path.stem} rank {rank}: {problem}", file=sys.stderr)
            print(
                f"{path.stem:24s} {plan_s:7.1f} {render_s:8.2f} {report.stat().st_size / 1024:8.0f} {load_ms:8.0f} "
                f"{wall_ms:8.0f} {svgs:4d} {len(seen.errors):6d} {len(seen.requests):7d} {sets:11d} {flags:13d} "
                f"{problems:8d}",
                flush=True,
            )
        browser.close()
    print(f"reports in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
