"""The HTML plan and fleet reports, rendered from real plan results: content, units, plots, escaping, size."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.placement.cluster import parse_cluster
from service.placement.fleet_plan import parse_fleet_spec, plan_fleet
from service.planning.catalog import Catalog
from service.planning.plan_spec import parse_plan_spec
from service.planning.search import MAX_SEARCH_SPACE, plan
from service.reporting import render_fleet_report, render_plan_report

REPO = Path(__file__).resolve().parents[1]
MAX_REPORT_BYTES = 2 * 1024 * 1024
XSS = "<script>alert('x')</script>"
# The only absolute URLs a report may hold: the SVG namespaces of its inline plots, which fetch nothing.
NAMESPACES = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}


# --- real plans, kept small ----------------------------------------------------------------------------------


def small_plan_spec(**slo: float) -> dict[str, Any]:
    """The 70B example cut to 8 GPUs with a TPOT SLO of 15 ms: quick, and it prunes for all three reasons."""
    spec: dict[str, Any] = yaml.safe_load((REPO / "examples" / "llama70b-h100.yaml").read_text())
    spec["max_gpus"] = 8
    spec["slo"] = {**spec["slo"], "tpot_ms": 15, **slo}
    spec["search"] = {
        "modes": ["collocated", "disaggregated"],
        "tp": [1, 2, 4, 8],
        "pp": [1, 2],
        "simulate_top": 2,
        "requests": 60,
    }
    return spec


def run_plan(spec: dict[str, Any], catalog: Catalog) -> dict[str, Any]:
    """What `splan plan SPEC --json` prints for ``spec``."""
    result = plan(parse_plan_spec(spec, catalog=catalog), catalog=catalog).as_dict()
    loaded: dict[str, Any] = json.loads(json.dumps(result))
    return loaded


@dataclass
class PlanCase:
    spec: dict[str, Any]
    result: dict[str, Any]
    html: str


@pytest.fixture(scope="module")
def case(catalog: Catalog) -> PlanCase:
    spec = small_plan_spec()
    result = run_plan(spec, catalog)
    return PlanCase(spec, result, render_plan_report(spec, result))


def fleet_spec_counts() -> dict[str, Any]:
    """Two deployments that fit 16 H100s (one named with markup) and one asking for a GPU type the fleet lacks."""
    search = {"modes": ["collocated"], "pp": [1], "requests": 60, "simulate_top": 2}
    return {
        "kind": "fleet",
        "gpus": {"h100-sxm": 16},
        "deployments": [
            {
                "name": f"chat-8b {XSS}",
                "model": "llama-3.1-8b",
                "workload": {"arrival": "poisson", "isl": 1024, "osl": 128, "rate": 20},
                "slo": {"ttft_ms": 500, "tpot_ms": 30},
                "search": {**search, "tp": [1, 2]},
            },
            {
                "name": "chat-70b",
                "model": "llama-3.1-70b",
                "weight_dtype": "fp8",
                "workload": {"arrival": "poisson", "isl": 2048, "osl": 256, "rate": 5},
                "slo": {"ttft_ms": 1000, "tpot_ms": 50},
                "search": {**search, "tp": [2, 4]},
            },
            {
                "name": "on-b200",
                "model": "llama-3.1-8b",
                "workload": {"arrival": "poisson", "isl": 512, "osl": 64, "rate": 1},
                "slo": {"ttft_ms": 500, "tpot_ms": 30},
                "gpu_types": ["b200"],
            },
        ],
    }


@dataclass
class FleetCase:
    spec: dict[str, Any]
    result: dict[str, Any]
    html: str


@pytest.fixture(scope="module")
def fleet_case(catalog: Catalog) -> FleetCase:
    spec = fleet_spec_counts()
    result = plan_fleet(parse_fleet_spec(spec), catalog=catalog, now_s=0.0)
    result = json.loads(json.dumps(result))
    return FleetCase(spec, result, render_fleet_report(spec, result))


@pytest.fixture(scope="module")
def cluster_case(catalog: Catalog) -> FleetCase:
    spec = fleet_spec_counts()
    spec["deployments"] = spec["deployments"][:2]
    del spec["gpus"]
    spec["cluster"] = "lab"
    cluster = parse_cluster(yaml.safe_load((REPO / "examples" / "cluster.yaml").read_text()))
    result = plan_fleet(parse_fleet_spec(spec), catalog=catalog, cluster=cluster, now_s=0.0)
    result = json.loads(json.dumps(result))
    return FleetCase(spec, result, render_fleet_report(spec, result))


# --- reading the HTML back ------------------------------------------------------------------------------------


@dataclass
class Table:
    headers: list[str] = field(default_factory=list)
    rows: list[tuple[str, list[str]]] = field(default_factory=list)


class Tables(HTMLParser):
    """Every table of a page by its class (unclassed ones as #n): header texts and (row class, cell texts)."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, Table] = {}
        self._table: Table | None = None
        self._row: list[str] | None = None
        self._row_cls = ""
        self._cell: list[str] | None = None
        self._head = False
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attr.get("class") or f"#{len(self.tables)}", Table())
        elif tag in ("thead", "tbody"):
            self._head = tag == "thead"
        elif tag == "tr":
            self._row, self._row_cls = [], attr.get("class") or ""
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            if self._head:
                self._table.headers = self._row
            else:
                self._table.rows.append((self._row_cls, self._row))
            self._row = None
        elif tag == "table":
            self._table, self._head = None, False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def tables(page: str) -> dict[str, Table]:
    return Tables(page).tables


def section(page: str, section_id: str) -> str:
    found = re.search(rf'<section id="{section_id}">(.*?)</section>', page, re.DOTALL)
    assert found is not None, section_id
    return found.group(1)


def svgs(page: str) -> dict[str, str]:
    """Inline SVG elements by their aria-label."""
    return {
        m.group(1): m.group(0) for m in re.finditer(r'<svg role="img" aria-label="([^"]*)".*?</svg>', page, re.DOTALL)
    }


def text_of(fragment: str) -> str:
    """Visible text of an HTML fragment, whitespace collapsed."""
    blocks = re.sub(r"</?(?:p|h\d|li|ul|div|td|th|tr|br|section|figure|figcaption)\b[^>]*>", " ", fragment)
    return " ".join(re.sub(r"<[^>]+>", "", blocks).split())


def assert_self_contained(page: str) -> None:
    refs = re.findall(r"""\b(?:src|href|xlink:href|action|poster)\s*=\s*["']([^"']*)""", page, re.IGNORECASE)
    assert all(ref.startswith(("#", "data:")) for ref in refs), refs
    urls = re.findall(r"""url\(\s*["']?([^)"']*)""", page)
    assert all(url.startswith("#") for url in urls), urls
    assert set(re.findall(r"""https?://[^\s"'<>)]+""", page)) <= NAMESPACES
    for tag in ("<script", "<iframe", "<object", "<embed", "<img", "@import"):
        assert tag not in page.lower()
    assert len(page.encode("utf-8")) <= MAX_REPORT_BYTES


UNITLESS_HEADERS = {"Strategy (layout)", "Mode", "Bottleneck", "On Pareto frontier", "Dtypes (weights / KV)"}


# --- the plan report ---------------------------------------------------------------------------------------------


def test_the_plan_case_prunes_for_every_reason_and_ranks_several(case: PlanCase) -> None:
    categories = Counter(r["category"] for r in case.result["rejected"])
    assert set(categories) == {"does_not_fit", "tpot_floor", "analytic_bound"}
    assert len(case.result["strategies"]) >= 3
    assert case.result["strategies"][0]["goodput_rps"] > 0


def test_the_spec_searched_is_shown(case: PlanCase) -> None:
    values = {row[0]: row[1] for t in tables(section(case.html, "spec")).values() for _, row in t.rows}
    assert values["Model"] == "llama-3.1-70b"
    assert values["GPU"] == "h100-sxm"
    assert values["Max GPUs (count)"] == "8"
    assert values["Engine"] == "vllm"
    assert values["Weight dtype"] == "fp8"
    assert values["Arrival"] == "poisson"
    assert values["Input length (tokens)"] == "2048"
    assert values["Output length (tokens)"] == "256"
    assert values["TTFT (ms)"] == "1000"
    assert values["TPOT (ms)"] == "15"
    assert values["Attainment (% of requests)"] == "90%"
    assert values["Modes"] == "collocated, disaggregated"
    assert values["TP degrees"] == "1, 2, 4, 8"
    assert values["Strategies enumerated (count)"] == str(case.result["strategies_enumerated"])
    assert "<h1>Serving plan: llama-3.1-70b on h100-sxm</h1>" in case.html
    assert "<title>Serving plan: llama-3.1-70b on h100-sxm</title>" in case.html


def test_one_row_per_strategy_in_rank_order_with_its_numbers(case: PlanCase) -> None:
    strategies = case.result["strategies"]
    for name, row_cls in (("strategies", "strategy"), ("memory", "memory")):
        rows = tables(case.html)[name].rows
        assert [cells[1] for _, cells in rows] == [s["label"] for s in strategies]
        assert [cells[0] for _, cells in rows] == [str(s["rank"]) for s in strategies]
        assert [cls for cls, _ in rows] == [f"{row_cls} winner"] + [row_cls] * (len(strategies) - 1)
    ranking = tables(case.html)["strategies"]
    column = {h: i for i, h in enumerate(ranking.headers)}
    for (_, cells), s in zip(ranking.rows, strategies, strict=True):
        assert cells[column["Goodput (req/s)"]] == f"{s['goodput_rps']:,.2f}"
        assert cells[column["Goodput per GPU (req/s/GPU)"]] == f"{s['goodput_per_gpu']:,.3f}"
        assert cells[column["Cost ($/M output tokens)"]] == f"{s['cost_per_million_output_tokens_usd']:,.2f}"
        assert cells[column["TPOT p90 (ms)"]] == f"{s['tpot_ms']['p90']:,.1f}"
        assert cells[column["Speed per user (tokens/s)"]] == f"{1000 / s['tpot_ms']['p50']:,.1f}"
        assert cells[column["Output per GPU (tokens/s/GPU)"]] == f"{s['output_tokens_per_s'] / s['gpus']:,.0f}"
        assert cells[column["Bottleneck"]] == s["bottleneck"].replace("_", " ")
        assert cells[column["On Pareto frontier"]] == ("yes" if s["on_frontier"] else "no")
    memory = tables(case.html)["memory"]
    column = {h: i for i, h in enumerate(memory.headers)}
    for (_, cells), s in zip(memory.rows, strategies, strict=True):
        roles = s["memory_per_gpu"]
        weights = [f"{m['weights_gib']:,.1f}" for m in roles.values()]
        tokens = [f"{m['kv_capacity_tokens']:,}" for m in roles.values()]
        if len(roles) == 1:
            assert cells[column["Weights per GPU (GiB)"]] == weights[0]
            assert cells[column["KV capacity (tokens)"]] == tokens[0]
        else:
            assert cells[column["Weights per GPU (GiB)"]].split("\n") == [
                f"{role} {w}" for role, w in zip(roles, weights, strict=True)
            ]
            assert cells[column["KV capacity (tokens)"]].split("\n") == [
                f"{role} {t}" for role, t in zip(roles, tokens, strict=True)
            ]


def test_every_header_carries_its_unit(case: PlanCase) -> None:
    found = tables(case.html)
    headers = found["strategies"].headers + found["memory"].headers + found["pruned-counts"].headers
    for expected in (
        "Goodput (req/s)",
        "Goodput per GPU (req/s/GPU)",
        "Cost ($/M output tokens)",
        "TTFT p50 (ms)",
        "TPOT p90 (ms)",
        "Weights per GPU (GiB)",
        "KV cache per GPU (GiB)",
        "KV capacity (tokens)",
        "Output per GPU (tokens/s/GPU)",
    ):
        assert expected in headers
    for header in found["strategies"].headers + found["memory"].headers:
        assert header in UNITLESS_HEADERS or re.search(r"\([^)]+\)$", header), header


def test_plots_are_inline_svg_with_the_slo_lines(case: PlanCase) -> None:
    assert case.html.count("<svg") == 5
    plots = svgs(case.html)
    assert set(plots) == {
        "Pareto frontier",
        "Goodput per GPU against cost",
        "TTFT CDF",
        "TPOT CDF",
        "Step-time breakdown of the winner",
    }
    assert "TTFT SLO 1000 ms" in plots["TTFT CDF"]
    assert "TPOT SLO 15 ms" in plots["TPOT CDF"]
    assert "attainment 90%" in plots["TPOT CDF"]
    top = case.result["strategies"][:3]
    for index, s in enumerate(top):
        assert f"#{index + 1} {s['label']}" in plots["TTFT CDF"]
    assert "#4 " not in plots["TTFT CDF"]
    assert "output tokens/s per GPU" in plots["Pareto frontier"]
    for part in ("GEMM", "attention", "communication", "CPU dispatch", "other"):
        assert part in plots["Step-time breakdown of the winner"]
    # Text stays text (svg.fonttype none), not glyph outlines, and no XML prolog sits inside the HTML.
    assert "<?xml" not in case.html
    assert "<!DOCTYPE svg" not in case.html
    assert "<text" in plots["TTFT CDF"]


def test_the_winner_sentence_comes_from_the_numbers(case: PlanCase) -> None:
    winner, runner = case.result["strategies"][:2]
    sentence = text_of(section(case.html, "winner"))
    margin = winner["goodput_per_gpu"] / runner["goodput_per_gpu"] - 1
    assert f"{winner['label']} wins with the highest goodput per GPU: {winner['goodput_per_gpu']:,.3f} req/s/GPU" in (
        sentence
    )
    assert f"{margin * 100:.1f}% above the runner-up {runner['label']}" in sentence
    assert f"p90 TPOT {winner['tpot_ms']['p90']:,.1f} ms (SLO 15 ms)" in sentence
    assert f"costs ${winner['cost_per_million_output_tokens_usd']:,.2f} per million output tokens" in sentence
    on = "It is on the Pareto frontier" in sentence
    assert on == winner["on_frontier"]


def test_pruned_counts_and_every_rejection_with_its_reason(case: PlanCase) -> None:
    rejected = case.result["rejected"]
    counts = {cells[0]: int(cells[2].replace(",", "")) for _, cells in tables(case.html)["pruned-counts"].rows}
    assert counts == dict(Counter(r["category"] for r in rejected))
    listed = tables(case.html)["rejected"].rows
    assert [(cells[0], cells[1], cells[2]) for _, cells in listed] == [
        (r["strategy"], r["category"], r["reason"]) for r in rejected
    ]
    assert re.search(r'<details id="rejected-list"><summary>All \d+ pruned strategies and why</summary>', case.html)


def test_the_report_is_self_contained_and_small(case: PlanCase) -> None:
    assert_self_contained(case.html)
    assert case.html.startswith("<!DOCTYPE html>")
    assert "Content-Security-Policy" in case.html


def test_the_largest_search_still_fits_in_two_megabytes(case: PlanCase) -> None:
    """MAX_SEARCH_SPACE rejections with the longest reason and 100 simulated strategies (50 a mode)."""
    result = copy.deepcopy(case.result)
    longest = max(result["rejected"], key=lambda r: len(r["reason"]))
    label = "P tp8-dp8-pp2-ep64 x{} + D tp8-dp8-ep64 x1"
    result["rejected"] = [{**longest, "strategy": label.format(i)} for i in range(MAX_SEARCH_SPACE)]
    winner = result["strategies"][0]
    result["strategies"] = [{**winner, "rank": i + 1, "label": f"P tp2 x{i} + D tp4 x1"} for i in range(100)]
    page = render_plan_report(small_plan_spec(), result)
    assert_self_contained(page)
    assert len(tables(page)["rejected"].rows) == MAX_SEARCH_SPACE
    # Reasons five times as long: the list stops, says how many it left out, and the counts still cover all.
    for r in result["rejected"]:
        r["reason"] = r["reason"] * 5
    page = render_plan_report(small_plan_spec(), result)
    assert_self_contained(page)
    listed = tables(page)["rejected"].rows
    cls, more = listed[-1]
    assert cls == "more"
    assert (
        more[2] == f"{MAX_SEARCH_SPACE - len(listed) + 1:,} more pruned strategies not listed, to keep the page small"
    )
    assert len(listed) > 1000
    counts = {cells[0]: int(cells[2].replace(",", "")) for _, cells in tables(page)["pruned-counts"].rows}
    assert counts == {longest["category"]: MAX_SEARCH_SPACE}


def test_user_strings_are_escaped(case: PlanCase) -> None:
    spec = copy.deepcopy(case.spec)
    spec["model"] = XSS
    spec["workload"]["isl"] = "<b>2048</b>"
    page = render_plan_report(spec, case.result, title=f"plan {XSS}")
    assert "<script" not in page
    assert "<b>2048" not in page
    assert "<h1>plan &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;</h1>" in page
    values = {row[0]: row[1] for t in tables(section(page, "spec")).values() for _, row in t.rows}
    assert values["Model"] == XSS
    assert values["Input length (tokens)"] == "<b>2048</b>"


def test_a_plan_without_strategies_says_so(catalog: Catalog) -> None:
    spec = small_plan_spec(tpot_ms=1)
    result = run_plan(spec, catalog)
    assert result["strategies"] == []
    page = render_plan_report(spec, result)
    assert '<p class="warn" id="no-strategies">No strategies:' in page
    assert "every layout was pruned" in text_of(section(page, "winner"))
    assert page.count("<svg") == 0
    assert "strategies" not in tables(page)
    counts = {cells[0]: int(cells[2]) for _, cells in tables(page)["pruned-counts"].rows}
    assert counts == dict(Counter(r["category"] for r in result["rejected"]))
    assert_self_contained(page)


def test_a_plan_where_nothing_meets_the_slos_says_so(catalog: Catalog) -> None:
    spec = small_plan_spec(ttft_ms=1)
    result = run_plan(spec, catalog)
    assert result["strategies"]
    assert all(s["goodput_rps"] == 0 for s in result["strategies"])
    page = render_plan_report(spec, result)
    assert "No strategy meets TTFT 1 ms and TPOT 15 ms for 90% of requests at any rate" in text_of(
        section(page, "winner")
    )
    assert "no goodput rate to show latencies at" in section(page, "cdfs")
    assert len(tables(page)["strategies"].rows) == len(result["strategies"])


def test_unsimulated_strategies_render_with_dashes(case: PlanCase) -> None:
    result = copy.deepcopy(case.result)
    latency_keys = {"ttft_ms", "tpot_ms", "e2e_ms", "output_tokens_per_s", "bottleneck", "step_time_shares"}
    latency_keys |= {"cdf_quantiles", "ttft_cdf_ms", "tpot_cdf_ms", "memory_per_gpu", "peak_kv_fraction"}
    for s in result["strategies"]:
        for key in latency_keys:
            s.pop(key)
        s["cost_per_million_output_tokens_usd"] = None
    page = render_plan_report(case.spec, result)
    ranking = tables(page)["strategies"]
    column = {h: i for i, h in enumerate(ranking.headers)}
    for _, cells in ranking.rows:
        assert cells[column["TTFT p90 (ms)"]] == "–"
        assert cells[column["Cost ($/M output tokens)"]] == "–"
    assert "No step-time breakdown" in section(page, "breakdown")
    assert "nothing to plot" in section(page, "frontier")
    assert "no goodput rate to show latencies at" not in page  # they have goodput, only no latencies
    assert page.count("<svg") == 0


def test_rendering_is_deterministic(case: PlanCase) -> None:
    assert render_plan_report(case.spec, case.result) == case.html


def test_importing_the_reports_does_not_import_matplotlib() -> None:
    code = "import sys, service.reporting; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


# --- the fleet report -------------------------------------------------------------------------------------------


def test_fleet_rows_per_deployment_with_strategy_and_gpus(fleet_case: FleetCase) -> None:
    rows = tables(fleet_case.html)["deployments"]
    column = {h: i for i, h in enumerate(rows.headers)}
    assert [cells[0] for _, cells in rows.rows] == [d["name"] for d in fleet_case.spec["deployments"]]
    planned = {d["name"]: d for d in fleet_case.result["deployments"]}
    assert len(planned) == 2
    for cls, cells in rows.rows:
        got = planned.get(cells[0])
        if got is None:
            assert cls == "deployment unmet"
            assert cells[column["Status"]] == "not met: none of its gpu_types is in the fleet"
            continue
        assert cls == "deployment"
        assert cells[column["Strategy (layout)"]] == got["strategy"]
        assert cells[column["GPU type"]] == got["gpu_type"]
        assert cells[column["GPUs (count)"]] == str(got["gpus"])
        assert cells[column["Instances (count)"]] == str(got["instances"])
        assert cells[column["Goodput per instance (req/s)"]] == f"{got['goodput_per_instance_rps']:,.2f}"
        assert cells[column["TPOT p90 (ms)"]] == f"{got['tpot_ms']['p90']:,.1f}"
        assert cells[column["Status"]] == "placed"
    for header in rows.headers:
        assert header in {"Deployment", "Model", "GPU type", "Strategy (layout)", "Status"} or re.search(
            r"\([^)]+\)$", header
        )


def test_fleet_gpus_by_type_and_the_unmet_deployment(fleet_case: FleetCase) -> None:
    result = fleet_case.result
    rows = {cells[0]: cells for _, cells in tables(fleet_case.html)["gpu-types"].rows}
    assert set(rows) == {"h100-sxm"}
    used, available = result["gpus_used_by_type"]["h100-sxm"], result["gpus_available_by_type"]["h100-sxm"]
    assert rows["h100-sxm"][1:4] == [str(available), str(used), str(available - used)]
    assert used == sum(d["gpus"] for d in result["deployments"])
    summary = text_of(section(fleet_case.html, "summary"))
    assert f"1 of 3 deployments cannot be met (on-b200); 2 placed on {result['total_gpus']} GPUs" in summary
    unmet = text_of(section(fleet_case.html, "unmet"))
    assert unmet == "Unmet deployments on-b200: none of its gpu_types is in the fleet"
    assert "not assigned to servers" in section(fleet_case.html, "where")
    assert fleet_case.html.count("<svg") == 1
    assert "<h1>Fleet plan: 3 deployments</h1>" in fleet_case.html


def test_fleet_report_escapes_names_and_is_self_contained(fleet_case: FleetCase) -> None:
    assert_self_contained(fleet_case.html)
    assert "chat-8b &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in fleet_case.html
    assert "<script" not in fleet_case.html


def test_fleet_on_a_cluster_says_what_runs_on_which_server(cluster_case: FleetCase) -> None:
    result = cluster_case.result
    assert result["all_slos_met"]
    expected: dict[str, list[tuple[str, str]]] = {}
    for d in result["deployments"]:
        for instance in d["instances_placed"]:
            ids = ", ".join(str(g) for g in instance["gpu_ids"])
            expected.setdefault(instance["server"], []).append((ids, d["name"]))
    where = section(cluster_case.html, "where")
    blocks = re.findall(r'<div class="server"><h3>([^<]+) <span', where)
    assert blocks == sorted(expected)
    for server, chunk in zip(blocks, where.split('<div class="server">')[1:], strict=True):
        rows = tables(chunk)["placements"].rows
        assert sorted((cells[0], cells[1]) for _, cells in rows) == sorted(expected[server])
    assert_self_contained(cluster_case.html)
    assert "All 2 deployments meet their SLOs" in text_of(section(cluster_case.html, "summary"))
