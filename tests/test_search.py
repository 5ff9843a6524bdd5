"""The pruned search (analytic ranking, top-k simulated) picks what simulating every strategy picks."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.planning import search
from service.planning.catalog import Catalog
from service.planning.deployment import Mode, simulate_deployment
from service.planning.plan_spec import parse_plan_spec
from service.planning.search import (
    DEFAULT_MOE_ATTENTION_DP,
    MAX_SEARCH_SPACE,
    Candidate,
    PlanRequest,
    SearchLimits,
    Slo,
    _base_deployment,
    _layouts,
    _simulate_unit,
    count_search_space,
    plan,
)
from service.planning.specs import PlanningError
from service.planning.stepcost import ParallelLayout, validate_layout
from service.planning.workload import ArrivalKind, sample_requests

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


# --- MoE layouts: attention TP x attention-DP x PP with pure-EP or pure-TP MoE layers -------------------------

MOE_SPEC = {
    "model": "qwen3-30b-a3b",
    "gpu": "h100-sxm",
    "max_gpus": 8,
    "weight_dtype": "fp8",
    "engine": "sglang",
    "workload": {"arrival": "poisson", "isl": 1024, "osl": 128, "rate": 1},
    "slo": {"ttft_ms": 1500, "tpot_ms": 40},
    "search": {"modes": ["collocated"], "tp": [1, 2], "pp": [1], "requests": 60, "simulate_top": 3},
}


def _request(catalog: Catalog, spec: dict[str, Any], **search: Any) -> PlanRequest:
    return parse_plan_spec({**spec, "search": {**spec.get("search", {}), **search}}, catalog=catalog)


def test_moe_enumeration_has_attention_dp_ep_and_moe_tp_layouts(catalog: Catalog) -> None:
    request = _request(catalog, {**MOE_SPEC, "model": "deepseek-r1", "max_gpus": 64}, tp=[1, 2, 4, 8], pp=[1, 2])
    layouts = _layouts(request.model, request.limits, request.max_gpus)
    labels = {layout.label() for layout in layouts}
    # Wide EP (SGLang --enable-dp-attention --ep), TP attention with EP experts, and pure MoE-TP.
    assert {"tp1-dp32-ep32", "tp8-dp8-ep64", "tp8-ep8", "tp8-dp2-ep16", "tp8", "tp4-dp4"} <= labels
    for layout in layouts:
        validate_layout(request.model, layout)
        assert layout.expert_tp * layout.moe_ep == layout.tp * layout.attention_dp
        assert layout.moe_ep in (1, layout.tp * layout.attention_dp)
        assert layout.gpus <= 64
    assert any(layout.moe_ep > 1 and layout.attention_dp > 1 for layout in layouts)


def test_moe_enumeration_refuses_no_valid_layout(catalog: Catalog) -> None:
    # Every (tp, dp, pp) and every pure-EP / pure-TP split that validate_layout accepts is enumerated.
    request = _request(catalog, {**MOE_SPEC, "model": "qwen3-235b-a22b", "max_gpus": 32}, tp=[1, 2, 4, 8, 16])
    model = request.model
    enumerated = set(_layouts(model, request.limits, request.max_gpus))
    expected = set()
    for tp, dp, pp in itertools.product([1, 2, 4, 8, 16], DEFAULT_MOE_ATTENTION_DP, [1]):
        for ep in {1, tp * dp}:
            layout = ParallelLayout(tp=tp, pp=pp, attention_dp=dp, moe_ep=ep)
            if layout.gpus > 32:
                continue
            try:
                validate_layout(model, layout)
            except PlanningError:
                continue
            expected.add(layout)
    assert enumerated == expected
    # Explicit degrees give mixed moe_tp x moe_ep splits.
    mixed = _request(catalog, {**MOE_SPEC, "model": "qwen3-235b-a22b", "max_gpus": 32}, tp=[8], moe_ep=[4])
    assert {layout.label() for layout in _layouts(mixed.model, mixed.limits, 32)} == {
        "tp8-ep4-moetp2",
        "tp8-dp2-ep4-moetp4",
        "tp8-dp4-ep4-moetp8",
    }


def test_attention_dp_covers_gpus_that_tp_cannot_split(catalog: Catalog) -> None:
    # 24 GPUs: tp24 divides neither model's heads; tp8 x dp3 uses them all where the MoE layers split 24 ways.
    qwen = _request(catalog, {**MOE_SPEC, "model": "qwen3-235b-a22b", "max_gpus": 24}, tp=[8, 24], attention_dp=[1, 3])
    labels = {layout.label() for layout in _layouts(qwen.model, qwen.limits, 24)}
    assert "tp8-dp3" in labels  # pure MoE-TP: 1536 / 24 = 64 columns per GPU
    assert not any(label.startswith("tp24") for label in labels)
    r1 = _request(catalog, {**MOE_SPEC, "model": "deepseek-r1", "max_gpus": 24}, tp=[8, 24], attention_dp=[1, 2, 3])
    r1_labels = {layout.label() for layout in _layouts(r1.model, r1.limits, 24)}
    assert {"tp8", "tp8-ep8", "tp8-dp2", "tp8-dp2-ep16"} <= r1_labels
    # DeepSeek-R1's 128 heads split tp8 x dp3, but 24 GPUs split neither its 256 experts nor their width 2048.
    with pytest.raises(PlanningError, match=r"experts|expert width"):
        validate_layout(r1.model, ParallelLayout(tp=8, attention_dp=3, moe_ep=24))
    with pytest.raises(PlanningError, match="expert width"):
        validate_layout(r1.model, ParallelLayout(tp=8, attention_dp=3, moe_ep=1))
    with pytest.raises(PlanningError, match="attention heads"):
        validate_layout(r1.model, ParallelLayout(tp=24))


def test_dense_models_keep_tp_pp_unless_attention_dp_is_asked(catalog: Catalog) -> None:
    request = parse_plan_spec(SPEC, catalog=catalog)
    layouts = _layouts(request.model, request.limits, request.max_gpus)
    assert {layout.attention_dp for layout in layouts} == {1}
    assert {layout.moe_ep for layout in layouts} == {1}
    asked = _request(catalog, SPEC, attention_dp=[1, 2])
    assert any(layout.attention_dp == 2 for layout in _layouts(asked.model, asked.limits, asked.max_gpus))


def test_search_space_counts_the_moe_layouts(catalog: Catalog) -> None:
    wide = _request(
        catalog, {**MOE_SPEC, "model": "deepseek-r1", "max_gpus": 64}, modes=["collocated", "disaggregated"]
    )
    tp_only = _request(
        catalog,
        {**MOE_SPEC, "model": "deepseek-r1", "max_gpus": 64},
        modes=["collocated", "disaggregated"],
        attention_dp=[1],
        moe_ep=[1],
    )
    assert count_search_space(wide) > count_search_space(tp_only) * 10
    assert count_search_space(wide) <= MAX_SEARCH_SPACE


@pytest.mark.parametrize(
    ("search", "field"),
    [
        ({"attention_dp": [0]}, "search.attention_dp"),
        ({"attention_dp": []}, "search.attention_dp"),
        ({"attention_dp": "wide"}, "search.attention_dp"),
        ({"moe_ep": "all"}, "search.moe_ep"),
        ({"moe_ep": []}, "search.moe_ep"),
        ({"moe_ep": [0]}, "search.moe_ep"),
        ({"tp": [0]}, "search.tp"),
        ({"pp": []}, "search.pp"),
    ],
)
def test_search_keys_are_validated_at_the_door(catalog: Catalog, search: dict[str, Any], field: str) -> None:
    with pytest.raises(PlanningError) as err:
        _request(catalog, MOE_SPEC, **search)
    message = str(err.value)
    assert field in message
    assert "\n" not in message


def test_expert_parallelism_on_a_dense_model_is_refused(catalog: Catalog) -> None:
    with pytest.raises(PlanningError, match=r"search\.moe_ep"):
        _request(catalog, SPEC, moe_ep=[2])


def test_moe_plan_ranks_attention_dp_ep_layouts(catalog: Catalog) -> None:
    request = _request(catalog, MOE_SPEC, modes=["collocated", "disaggregated"], tp=[1, 2], attention_dp=[2, 4])
    result = plan(request, catalog=catalog)
    layouts = []
    for strategy in result.strategies:
        assert strategy["label"]
        described = strategy["layout"]
        pools = [described] if strategy["mode"] == "collocated" else [described["prefill"], described["decode"]]
        for pool in pools:
            assert set(pool) >= {"tp", "pp", "attention_dp", "moe_tp", "moe_ep"}
            assert pool["moe_tp"] * pool["moe_ep"] == pool["tp"] * pool["attention_dp"]
            layouts.append(pool)
    # Dropping the EP layouts from the enumeration would fail here.
    assert any(pool["moe_ep"] > 1 and pool["attention_dp"] > 1 for pool in layouts)
    assert result.strategies[0]["goodput_rps"] > 0


def test_folded_simulation_serves_the_offered_rate(catalog: Catalog) -> None:
    # One simulated attention-DP rank (or disaggregated unit) stands for all: the deployment's completed
    # rate equals the offered rate at light load, as when every instance is simulated.
    request = _request(catalog, MOE_SPEC)
    base = _base_deployment(request, catalog)
    workload = replace(request.workload, num_requests=120)
    sample = sample_requests(workload)
    layout = ParallelLayout(tp=1, attention_dp=4, moe_ep=4)
    collocated = replace(base, layout=layout, replicas=2)
    disaggregated = replace(
        base,
        mode=Mode.DISAGGREGATED,
        prefill_layout=ParallelLayout(tp=2, attention_dp=2, moe_ep=4),
        prefill_workers=1,
        decode_layout=layout,
        decode_workers=1,
    )
    for deployment, units in ((collocated, 8), (disaggregated, 2)):
        rate = 4.0
        folded = _simulate_unit(deployment, workload, sample.repeated(4), rate, {})
        assert folded.scale == units
        assert folded.requests_per_s == pytest.approx(rate, rel=0.2)
        full = simulate_deployment(replace(deployment), replace(workload, num_requests=480), rate_per_s=rate)
        if deployment.mode is Mode.DISAGGREGATED:
            assert full.requests_per_s == pytest.approx(folded.requests_per_s, rel=0.2)


def test_a_spec_whose_search_keys_leave_no_layout_is_refused_at_the_door() -> None:
    from service.catalog.loader import default_catalog
    from service.planning.plan_spec import parse_plan_spec

    spec = {
        "model": "qwen3-235b-a22b",
        "gpu": "h100-sxm",
        "max_gpus": 16,
        "weight_dtype": "fp8",
        "workload": {"isl": 256, "osl": 16, "rate": 1},
        "slo": {"ttft_ms": 1000, "tpot_ms": 100},
        "search": {"moe_ep": [3]},
    }
    with pytest.raises(PlanningError, match=r"no parallel layout of qwen3-235b-a22b fits in 16 GPUs with search\.tp"):
        parse_plan_spec(spec, catalog=default_catalog())


def _doubling_then_bisection(threshold: float, hi: float, tolerance: float) -> tuple[float, int]:
    """The rate search as it was before climbing from hi (goodput and levels probed), on a unit that meets the SLOs
    exactly up to ``threshold``."""
    probes = 0

    def passes(level: float) -> bool:
        nonlocal probes
        probes += 1
        return level <= threshold

    lo = hi * 0.02
    if not passes(lo):
        return 0.0, probes
    top = passes(hi)
    for _ in range(4):
        if not top:
            break
        lo, hi = hi, hi * 2
        top = passes(hi)
    for _ in range(12):
        if hi - lo <= tolerance * hi:
            break
        mid = (lo + hi) / 2
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return lo, probes


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 64 * 20), st.floats(0.5, 200.0))
def test_climbing_from_hi_brackets_the_goodput_where_doubling_and_bisection_did(
    sixty_fourths: int, bound_rps: float
) -> None:
    # A unit meets the SLOs up to a threshold rate (between the lattice points a search can end on); the search
    # must report what the doubling-then-bisection search reported, and probe no more levels when the goodput is
    # within an eighth above hi (1.3 x the analytic bound, where the goodput mostly is).
    hi = bound_rps * 1.3
    threshold = hi * (sixty_fourths + 0.5) / 64
    probed: list[float] = []

    class Result:
        def __init__(self, level: float) -> None:
            self.level = level
            self.e2e_s = np.ones(4)

        def attainment(self, ttft_s: float, tpot_s: float) -> float:
            return 1.0 if self.level <= threshold else 0.0

    class Estimate:
        def __init__(self, level: float) -> None:
            self.result = Result(level)
            self.requests_per_s = level

    class Sample:
        unit_arrival_s = np.array([0.0, 10.0])
        input_tokens = np.zeros(100)

        def repeated(self, times: int) -> Sample:
            return self

    def simulate(deployment: Any, workload: Any, sample: Any, level: float, cache: Any, checkpoint: Any) -> Any:
        if not probed or probed[-1] != level:
            probed.append(level)
        return Estimate(level)

    limits = SearchLimits()
    candidate = Candidate(deployment=None, bound_rps=bound_rps)  # type: ignore[arg-type]
    workload = type("Open", (), {"arrival": ArrivalKind.POISSON})()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(search, "_simulate_unit", simulate)
        patch.setattr(search, "unit_fold", lambda deployment, workload: 1)
        search._goodput(candidate, workload, Sample(), Slo(1000, 50), limits)  # type: ignore[arg-type]
    expected, probes = _doubling_then_bisection(threshold, hi, limits.rate_tolerance)
    assert candidate.goodput_rps == pytest.approx(expected, rel=1e-9)
    assert candidate.goodput_rps <= threshold
    if hi <= threshold < hi * 1.125:
        assert len(probed) < probes


def test_a_plan_specs_moe_routing_reaches_every_strategy(catalog: Catalog) -> None:
    stated = _request(catalog, {**MOE_SPEC, "engine_settings": {"moe_routing": "power_law_1.2"}})
    assert stated.knobs.moe_routing == "power_law_1.2"
    assert _request(catalog, MOE_SPEC).knobs.moe_routing is None
