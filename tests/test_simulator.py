"""Simulator behaviour: determinism, load response, KV pressure, disaggregation."""

from __future__ import annotations

from dataclasses import replace

import pytest

from service.planning.catalog import Catalog
from service.planning.deployment import Mode
from service.planning.estimate import EstimateRequest, run_estimate
from service.planning.specs import PlanningError


def _est(catalog: Catalog, **kw: object) -> dict:  # type: ignore[type-arg]
    base: dict[str, object] = {"model": "llama-3.1-8b", "gpu": "h100-sxm", "isl": 1024, "osl": 128}
    base.update(kw)
    return run_estimate(EstimateRequest(**base), catalog=catalog).as_dict()  # type: ignore[arg-type]


def test_same_seed_same_answer(catalog: Catalog) -> None:
    a = _est(catalog, rate=5.0, isl="lognormal:1000:400", seed=3, requests=200)
    b = _est(catalog, rate=5.0, isl="lognormal:1000:400", seed=3, requests=200)
    assert a["ttft_ms"] == b["ttft_ms"]
    assert a["tpot_ms"] == b["tpot_ms"]


def test_more_concurrency_raises_tpot_and_throughput(catalog: Catalog) -> None:
    low = _est(catalog, concurrency=2)
    high = _est(catalog, concurrency=64)
    assert high["tpot_ms"]["mean"] > low["tpot_ms"]["mean"]
    assert high["throughput"]["output_tokens_per_s"] > 4 * low["throughput"]["output_tokens_per_s"]


def test_closed_loop_completes_every_request(catalog: Catalog) -> None:
    out = _est(catalog, concurrency=8, requests=40)
    assert out["completed"] == 40
    assert out["ttft_ms"]["p50"] <= out["ttft_ms"]["p99"]


def test_overload_queues(catalog: Catalog) -> None:
    light = _est(catalog, rate=1.0, requests=200)
    heavy = _est(catalog, rate=200.0, requests=200)
    assert heavy["ttft_ms"]["p90"] > 10 * light["ttft_ms"]["p90"]


def test_small_kv_cache_preempts(catalog: Catalog) -> None:
    out = _est(
        catalog,
        model="qwen3-32b",
        tp=1,
        concurrency=64,
        isl=2048,
        osl=512,
        requests=128,
        memory_fraction=0.93,
    )
    assert out["preemptions"] > 0 or out["peak_kv_fraction"] > 0.95


def test_disaggregated_runs_and_reports_both_pools(catalog: Catalog) -> None:
    out = _est(
        catalog,
        mode=Mode.DISAGGREGATED,
        prefill_tp=1,
        prefill_workers=1,
        decode_tp=1,
        decode_workers=1,
        concurrency=16,
        requests=64,
    )
    assert out["gpus"] == 2
    assert set(out["memory"]) == {"prefill", "decode"}
    assert out["completed"] == 64


def test_model_that_does_not_fit_is_refused(catalog: Catalog) -> None:
    with pytest.raises(PlanningError, match="does not fit"):
        _est(catalog, model="llama-3.1-70b", tp=1, rate=1.0)


def test_tp_must_divide_heads(catalog: Catalog) -> None:
    with pytest.raises(PlanningError, match="does not divide"):
        _est(catalog, tp=3, rate=1.0)


def test_moe_model_estimates(catalog: Catalog) -> None:
    out = _est(catalog, model="mixtral-8x7b", tp=2, ep=2, concurrency=8, requests=32)
    assert out["tpot_ms"]["mean"] > 0


def test_staggered_clients_avoid_the_burst_queue(catalog: Catalog) -> None:
    burst = _est(catalog, concurrency=32, requests=128)
    staggered = _est(catalog, concurrency=32, requests=128, client_start="staggered")
    # A burst queues 32 prefills behind each other; staggered clients mostly prefill alone.
    assert staggered["ttft_ms"]["mean"] < 0.5 * burst["ttft_ms"]["mean"]
    assert staggered["completed"] == burst["completed"] == 128


def test_unknown_client_start_is_refused(catalog: Catalog) -> None:
    with pytest.raises(PlanningError, match="client start"):
        _est(catalog, concurrency=4, client_start="sometimes")


def test_benchmark_protocol_request_counts(catalog: Catalog) -> None:
    from service.planning.estimate import resolve_workload

    fixed = resolve_workload(EstimateRequest(model="llama-3.1-8b", gpu="h100-sxm", isl=1024, osl=128, concurrency=4))
    # Fixed lengths: six rounds simulated, standing for aiperf's 20 per client.
    assert (fixed.num_requests, fixed.profiled_rounds) == (24, 20)
    ranged = resolve_workload(
        EstimateRequest(
            model="llama-3.1-8b",
            gpu="h100-sxm",
            isl="uniform:819:1024",
            osl="uniform:819:1024",
            concurrency=4,
            requests_per_client=10,
        )
    )
    # Drawn lengths: every round of `vllm bench serve --num-prompts 10C` is drawn and simulated.
    assert (ranged.num_requests, ranged.profiled_rounds) == (40, 10)
    with pytest.raises(PlanningError, match="requests per client"):
        resolve_workload(
            EstimateRequest(
                model="llama-3.1-8b", gpu="h100-sxm", isl=1024, osl=128, concurrency=4, requests_per_client=0
            )
        )


def test_ranged_lengths_desynchronise_the_clients(catalog: Catalog) -> None:
    # Fixed lengths keep the first wave's prefill groups; lengths drawn from [0.8 L, L] spread the clients, so
    # later requests mostly prefill alone (InferenceX sweeps, bench/e2e_accuracy.py).
    common: dict[str, object] = {"model": "llama-3.1-70b", "tp": 4, "weight_dtype": "fp8", "concurrency": 8}
    fixed = _est(catalog, **common, isl=1024, osl=1024)
    ranged = _est(catalog, **common, isl="uniform:819:1024", osl="uniform:819:1024", requests_per_client=10)
    assert ranged["completed"] == 80
    assert ranged["ttft_ms"]["mean"] < 0.5 * fixed["ttft_ms"]["mean"]


def test_api_server_latency_adds_to_ttft_and_e2e_only(catalog: Catalog) -> None:
    from dataclasses import replace

    engine = replace(catalog.engines["vllm"], request_overhead_s=0.0)
    slow_front = replace(engine, request_overhead_s=0.05)
    base = _est(replace(catalog, engines={**catalog.engines, "vllm": engine}), concurrency=4, requests=16)
    slow = _est(replace(catalog, engines={**catalog.engines, "vllm": slow_front}), concurrency=4, requests=16)
    assert slow["ttft_ms"]["mean"] == pytest.approx(base["ttft_ms"]["mean"] + 50.0)
    assert slow["e2e_ms"]["p50"] == pytest.approx(base["e2e_ms"]["p50"] + 50.0)
    assert slow["tpot_ms"] == base["tpot_ms"]


def _same_latencies(a: object, b: object) -> None:
    from service.planning.deployment import Estimate

    assert isinstance(a, Estimate)
    assert isinstance(b, Estimate)
    assert a.result.ttft_s.tolist() == b.result.ttft_s.tolist()
    assert a.result.tpot_s.tolist() == b.result.tpot_s.tolist()
    assert a.scale == b.scale
    assert a.requests_per_s == b.requests_per_s


@pytest.mark.parametrize("router", ["round_robin", "random", "least_loaded"])
def test_estimate_and_plan_give_the_same_latency_for_the_same_deployment_and_load(
    catalog: Catalog, router: str
) -> None:
    # Two TP2 replicas of Llama-8B at 12 req/s: `splan estimate` and the plan search's evaluation of the very
    # same deployment at the very same rate (one code path, simulate_deployment) must agree request for request.
    from service.planning.estimate import resolve_deployment, resolve_workload
    from service.planning.search import _simulate_unit
    from service.planning.workload import sample_requests

    request = EstimateRequest(
        model="llama-3.1-8b",
        gpu="h100-sxm",
        isl="uniform:200:1500",
        osl="uniform:20:200",
        rate=12.0,
        requests=150,
        tp=2,
        replicas=2,
        router=router,
        seed=4,
    )
    estimate = run_estimate(request, catalog=catalog)
    workload = resolve_workload(request)
    deployment = resolve_deployment(request, catalog)
    planned = _simulate_unit(deployment, workload, sample_requests(workload), 12.0, {})
    _same_latencies(estimate, planned)
    assert estimate.scale == (1 if router == "least_loaded" else 2)
    # Closed loop: the plan's level is one replica's clients.
    closed = replace(request, rate=None, concurrency=16, requests=96)
    workload = resolve_workload(closed)
    planned = _simulate_unit(deployment, workload, sample_requests(workload), 8.0, {})
    _same_latencies(run_estimate(closed, catalog=catalog), planned)


def test_the_router_changes_only_multi_replica_runs(catalog: Catalog) -> None:
    base = {"isl": "uniform:200:3000", "osl": "uniform:10:300", "rate": 30.0, "requests": 300, "seed": 2}
    one = {r: _est(catalog, router=r, **base)["ttft_ms"]["p90"] for r in ("round_robin", "random", "least_loaded")}
    assert len(set(one.values())) == 1
    many = {r: _est(catalog, router=r, replicas=3, **base)["ttft_ms"]["p90"] for r in one}
    # Round robin spreads load more evenly than random picks (fewer bursts on one replica).
    assert many["round_robin"] <= many["random"]


def test_max_model_len_refuses_longer_requests_and_sizes_the_kv_check(catalog: Catalog) -> None:
    out = _est(catalog, isl="uniform:100:4000", osl=100, rate=2.0, requests=100, max_model_len=2048)
    assert 0 < out["refused_requests"] < 100
    assert out["completed"] == 100 - out["refused_requests"]
    with pytest.raises(PlanningError, match="max_model_len 2000000"):
        _est(catalog, isl=100, osl=10, rate=1.0, requests=10, max_model_len=2_000_000)
    with pytest.raises(PlanningError, match="every request is longer"):
        _est(catalog, isl=3000, osl=100, rate=1.0, requests=10, max_model_len=1024)


def test_kv_block_size_and_memory_utilization_change_the_kv_pool(catalog: Catalog) -> None:
    small = _est(catalog, rate=1.0, requests=20, memory_fraction=0.5)
    big = _est(catalog, rate=1.0, requests=20, memory_fraction=0.9)
    assert small["memory"]["replica"]["kv_capacity_tokens"] < big["memory"]["replica"]["kv_capacity_tokens"]
    blocks = _est(catalog, rate=1.0, requests=20, kv_block_tokens=128)
    assert blocks["memory"]["replica"]["kv_capacity_tokens"] % 128 == 0
