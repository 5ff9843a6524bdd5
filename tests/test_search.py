"""The pruned search (analytic ranking, top-k simulated) picks what simulating every strategy picks."""

from __future__ import annotations

from dataclasses import replace

from service.planning.catalog import Catalog
from service.planning.plan_spec import parse_plan_spec
from service.planning.search import plan

SPEC = {
    "model": "qwen3-32b",
    "gpu": "h100-sxm",
    "max_gpus": 8,
    "weight_dtype": "fp8",
    "workload": {"arrival": "poisson", "isl": 2048, "osl": 256, "rate": 1},
    "slo": {"ttft_ms": 1500, "tpot_ms": 40},
    "search": {"modes": ["collocated"], "tp": [1, 2, 4, 8], "pp": [1, 2], "requests": 100, "simulate_top": 2},
}


def test_pruned_search_ranks_like_the_exhaustive_one(catalog: Catalog) -> None:
    request = parse_plan_spec(SPEC, catalog=catalog)
    fast = plan(request, catalog=catalog)
    exact = plan(replace(request, limits=replace(request.limits, simulate_top=50)), catalog=catalog)
    assert exact.evaluated > fast.evaluated
    assert fast.strategies[0]["label"] == exact.strategies[0]["label"]
    assert fast.strategies[0]["goodput_rps"] == exact.strategies[0]["goodput_rps"]
    # Everything the fast path ranks keeps its relative order in the exhaustive ranking.
    exact_order = [s["label"] for s in exact.strategies]
    fast_order = [s["label"] for s in fast.strategies]
    assert [label for label in exact_order if label in fast_order] == fast_order
