"""Simulator behaviour: determinism, load response, KV pressure, disaggregation."""

from __future__ import annotations

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
