"""`splan calibrate`: measured points and records parsed, known constants recovered, degenerate fits refused."""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from service.cli import main
from service.planning import user_calibration as uc
from service.planning.catalog import Catalog
from service.planning.estimate import EstimateRequest, run_estimate
from service.planning.profile import Profile, apply_profile, parse_profile
from service.planning.specs import DType
from service.planning.user_calibration import (
    PRIOR_FACTOR_LOG_SIGMA,
    RESIDUAL_SCALE,
    CalibrationError,
    MeasuredPoint,
    RequestRecord,
    _Evaluator,
    fit_cost,
    fit_profile,
    point_from_records,
    points_from_benchmark_rows,
    predicted_metrics,
    records_from_aiperf,
    records_from_vllm_bench,
    robust_loss,
    row_moe_backend,
)

TRUTH = Profile(
    gpu="h100-sxm",
    engine="vllm",
    memory_bandwidth_factor=0.85,
    compute_factor=0.9,
    engine_constants={"request_overhead_s": 0.05},
)


def synthetic_points(catalog: Catalog, truth: Profile = TRUTH) -> list[MeasuredPoint]:
    """Closed-loop runs of Llama-3.1-8B simulated with ``truth`` applied: what a user would have measured."""
    adjusted, _ = apply_profile(catalog, truth, gpu="h100-sxm", engine="vllm", model="llama-3.1-8b")
    points = []
    for concurrency in (1, 8, 32):
        for isl, osl in ((128, 256), (4096, 64)):
            request = EstimateRequest(
                model="llama-3.1-8b", gpu="h100-sxm", isl=isl, osl=osl, concurrency=concurrency, requests=24
            )
            predicted = predicted_metrics(run_estimate(request, catalog=adjusted).result)
            observed = {k: predicted[k] for k in ("ttft_mean", "tpot_mean")}
            points.append(MeasuredPoint(request, observed, f"c{concurrency}/{isl}", group="llama"))
    return points


def test_perturbed_constants_are_recovered_within_2_percent(catalog: Catalog) -> None:
    result = fit_profile(synthetic_points(catalog), catalog=catalog, gpu="h100-sxm", engine="vllm")
    profile = result.profile
    assert profile.memory_bandwidth_factor == pytest.approx(0.85, rel=0.02)
    assert profile.compute_factor == pytest.approx(0.9, rel=0.02)
    assert profile.engine_constants["request_overhead_s"] == pytest.approx(0.05, rel=0.02)
    assert result.after.median_pct < 1.0 < result.before.median_pct
    fitted = {v.name: v for v in result.values}
    assert fitted["memory_bandwidth"].fitted
    # The best calibrated memory efficiency on h100-sxm (decode attention, bf16 KV) taken to 1.
    best = catalog.calibration_for(catalog.gpu("h100-sxm")).attention_decode_bandwidth_efficiency[DType.BF16]
    assert fitted["memory_bandwidth"].upper == pytest.approx(1 / best)
    # Hidden by async scheduling on these loads: kept, with the reason.
    assert not fitted["step_overhead_s"].fitted
    assert "not identifiable" in fitted["step_overhead_s"].note
    assert not fitted["collective_bandwidth"].fitted
    # The written profile reads back and carries its fit report and scope.
    back = parse_profile(yaml.safe_load(yaml.safe_dump(profile.as_document())))
    assert back.models == ("llama-3.1-8b",)
    assert back.fit["residual_after"]["median_pct"] < 1.0


def test_the_api_latency_is_added_to_the_simulated_metrics_not_simulated(catalog: Catalog) -> None:
    points = synthetic_points(catalog)[:2]
    evaluator = _Evaluator(
        points,
        catalog=catalog,
        base=Profile(gpu="h100-sxm", engine="vllm"),
        names=["memory_bandwidth", "request_overhead_s"],
        fit_mode=False,
    )
    # ln(0.85) and 0.05 s (the fit variable of request_overhead_s is in units of 10 ms).
    _, predictions = evaluator.evaluate(np.array([np.log(0.85), 5.0]))
    _, other = evaluator.evaluate(np.array([np.log(0.85), 1.0]))
    assert evaluator.evaluations == 1  # the second vector differs in the API latency only: no simulation
    assert evaluator.is_free(np.array([np.log(0.85), 3.0]))
    assert not evaluator.is_free(np.array([np.log(0.9), 5.0]))
    truth = replace(TRUTH, compute_factor=1.0)
    adjusted, _ = apply_profile(catalog, truth, gpu="h100-sxm", engine="vllm", model="llama-3.1-8b")
    for point, predicted, moved in zip(points, predictions, other, strict=True):
        direct = predicted_metrics(run_estimate(point.request, catalog=adjusted).result)
        assert predicted == pytest.approx(direct, rel=1e-9)
        assert moved["ttft_p99"] == pytest.approx(direct["ttft_p99"] - 40.0, rel=1e-9)
        assert moved["tpot_mean"] == direct["tpot_mean"]


def test_the_prior_pulls_a_factor_toward_the_catalog(catalog: Catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    # One long-prompt run whose TTFT is 30% slower than the catalog predicts, fitted with compute alone.
    (point,) = synthetic_points(catalog, Profile(gpu="h100-sxm", engine="vllm"))[-1:]
    predicted = predicted_metrics(run_estimate(point.request, catalog=catalog).result)
    slow = replace(point, observed_ms={m: predicted[m] * 1.3 for m in ("ttft_mean", "ttft_p90")})

    def fitted_compute() -> tuple[float, float, float]:
        result = fit_profile([slow], catalog=catalog, gpu="h100-sxm", engine="vllm", fit=["compute"])
        (value,) = (v for v in result.values if v.name == "compute")
        return value.value, value.sigma, result.after.median_pct

    with_prior, sigma, residual = fitted_compute()
    monkeypatch.setattr(uc, "PRIOR_FACTOR_LOG_SIGMA", 1e6)
    without, _, exact = fitted_compute()
    # Without the prior the run is matched; with it the factor stays nearer 1 and some error is left.
    assert exact < 0.5 < residual
    assert without < with_prior < 1.0
    # The posterior of a factor is never wider than its prior (a quarter in log space).
    assert sigma <= with_prior * PRIOR_FACTOR_LOG_SIGMA
    assert RESIDUAL_SCALE == 0.05


def test_measured_residuals_are_soft_l1_and_the_prior_rows_plain_squares() -> None:
    z = np.array([0.0, 3.0, 8.0, 0.0, 9.0])
    rho = robust_loss(2)(z)
    # soft-L1 on the first three: 2(sqrt(1 + z) - 1) = 0, 2, 4; its slope 1/sqrt(1 + z) = 1, 1/2, 1/3.
    assert rho[0].tolist() == pytest.approx([0.0, 2.0, 4.0, 0.0, 9.0])
    assert rho[1].tolist() == pytest.approx([1.0, 0.5, 1 / 3, 1.0, 1.0])
    assert rho[2].tolist() == pytest.approx([-0.5, -0.0625, -0.5 / 27, 0.0, 0.0])
    # In residual units (f_scale 0.05): a measured residual of 0.15 costs 0.5 x 0.05^2 x 2(sqrt(10) - 1), a prior row
    # of 0.15 costs 0.15^2 / 2 however large.
    assert fit_cost(np.array([0.15, 0.15]), 1) == pytest.approx(0.0025 * (np.sqrt(10.0) - 1.0) + 0.01125)


def test_a_fit_that_converges_with_budget_left_goes_on_with_more_points(catalog: Catalog) -> None:
    points = synthetic_points(catalog)
    # This budget affords the first point only for a whole fit; fitting one parameter converges early, and what is
    # left affords about two more iterations on three (the parameters stay those chosen on the first point).
    small = fit_profile(points, catalog=catalog, gpu="h100-sxm", engine="vllm", work_budget_sequence_steps=100_000)
    more = fit_profile(points, catalog=catalog, gpu="h100-sxm", engine="vllm", work_budget_sequence_steps=140_000)
    assert (small.points_used, more.points_used) == (1, 3)
    assert more.notes == (
        "fitted on 1 of 6 points to stay within the budget of 140000 simulated sequence-steps",
        "then refitted from that solution on 3 of 6 points with the budget left",
    )
    assert [v.name for v in more.values if v.fitted] == ["memory_bandwidth"]
    assert more.profile.memory_bandwidth_factor != small.profile.memory_bandwidth_factor
    assert more.after.median_pct < more.before.median_pct
    assert more.evaluations > small.evaluations


def test_known_point_costs_spare_the_simulation_of_every_point(catalog: Catalog) -> None:
    points = synthetic_points(catalog)
    probe = _Evaluator(
        points, catalog=catalog, base=Profile(gpu="h100-sxm", engine="vllm"), names=["compute"], fit_mode=True
    )
    probe(np.zeros(1))
    costs = probe.point_sequence_steps
    kwargs: dict[str, Any] = {"catalog": catalog, "gpu": "h100-sxm", "engine": "vllm"}
    measured = fit_profile(points, work_budget_sequence_steps=100_000, **kwargs)
    given = fit_profile(points, work_budget_sequence_steps=100_000, point_costs=costs, **kwargs)
    # The same point kept and the same fit; the first simulation of all six points is what the given costs spare.
    assert (measured.points_used, measured.notes) == (given.points_used, given.notes)
    assert replace(measured.profile, fit={}) == replace(given.profile, fit={})
    assert measured.sequence_steps - given.sequence_steps == sum(costs)


def test_a_work_budget_gives_the_same_fit_whatever_the_clock(catalog: Catalog) -> None:
    points = synthetic_points(catalog)
    ticks = itertools.count()

    def racing_clock() -> float:
        # A machine so slow that any time budget is spent after one reading: a work budget does not look at it.
        return float(next(ticks)) * 1000.0

    results = [
        fit_profile(points, catalog=catalog, gpu="h100-sxm", engine="vllm", work_budget_sequence_steps=10**9, clock=c)
        for c in (racing_clock, lambda: 0.0)
    ]
    first, second = (r.profile for r in results)
    assert (first.memory_bandwidth_factor, first.compute_factor, first.engine_constants) == (
        second.memory_bandwidth_factor,
        second.compute_factor,
        second.engine_constants,
    )
    assert first.memory_bandwidth_factor == pytest.approx(0.85, rel=0.02)
    assert results[0].sequence_steps == results[1].sequence_steps > 0
    assert results[0].evaluations == results[1].evaluations
    assert not any("budget" in note for note in results[0].notes)
    # The same racing clock with a time budget runs out at once; a small work budget stops where its steps run out.
    timed = fit_profile(points, catalog=catalog, gpu="h100-sxm", engine="vllm", clock=racing_clock)
    assert any("s budget" in note for note in timed.notes)
    small = fit_profile(
        points,
        catalog=catalog,
        gpu="h100-sxm",
        engine="vllm",
        work_budget_sequence_steps=results[0].sequence_steps // 4,
    )
    assert any("simulated sequence-steps" in note for note in small.notes)
    assert small.sequence_steps < results[0].sequence_steps
    with pytest.raises(CalibrationError, match="at least one sequence-step"):
        fit_profile(points, catalog=catalog, gpu="h100-sxm", engine="vllm", work_budget_sequence_steps=0)


def test_degenerate_fits_are_refused(catalog: Catalog) -> None:
    points = synthetic_points(catalog)
    with pytest.raises(CalibrationError, match="no measured points"):
        fit_profile([], catalog=catalog, gpu="h100-sxm", engine="vllm")
    # One run, one metric: three parameters cannot be told apart.
    single = [replace(points[0], observed_ms={"tpot_mean": points[0].observed_ms["tpot_mean"]})]
    with pytest.raises(CalibrationError, match="cannot fit"):
        fit_profile(single, catalog=catalog, gpu="h100-sxm", engine="vllm", fit=["memory_bandwidth", "compute"])
    with pytest.raises(CalibrationError, match="unknown fit parameter 'speed'"):
        fit_profile(points, catalog=catalog, gpu="h100-sxm", engine="vllm", fit=["speed"])
    with pytest.raises(CalibrationError, match="cannot fit step_overhead_s"):
        fit_profile(points, catalog=catalog, gpu="h100-sxm", engine="vllm", fit=["step_overhead_s"])


def test_unphysical_fit_is_refused(catalog: Catalog) -> None:
    # Decode three times faster than the datasheet bandwidth allows.
    points = [replace(p, observed_ms={"tpot_mean": p.observed_ms["tpot_mean"] / 3}) for p in synthetic_points(catalog)]
    with pytest.raises(CalibrationError, match=r"memory_bandwidth at or beyond .* physical limit"):
        fit_profile(points, catalog=catalog, gpu="h100-sxm", engine="vllm", fit=["memory_bandwidth"])


def test_a_factor_at_its_limit_is_held_there_when_no_budget_is_left_to_refit(catalog: Catalog) -> None:
    points = [replace(p, observed_ms={"tpot_mean": p.observed_ms["tpot_mean"] / 3}) for p in synthetic_points(catalog)]
    # With budget, the factor the measurements need beyond its limit is held there and the rest refitted.
    full = fit_profile(points, catalog=catalog, gpu="h100-sxm", engine="vllm")
    # A clock that ticks a second per reading runs the budget out inside the first fit, before any refit: the same
    # factor is held at its limit (not refused), the others are reported as that fit left them.
    ticks = itertools.count()
    spent = fit_profile(
        points, catalog=catalog, gpu="h100-sxm", engine="vllm", time_budget_s=8, clock=lambda: float(next(ticks))
    )
    for result in (full, spent):
        held = [v for v in result.values if v.note.startswith("held at its physical limit")]
        assert [v.name for v in held] == ["memory_bandwidth"]
        assert held[0].value == held[0].upper == result.profile.memory_bandwidth_factor
        assert len({v.name for v in result.values}) == len(result.values)
    assert any(note.startswith("memory_bandwidth held at its physical limit") for note in spent.notes)
    compute = next(v for v in spent.values if v.name == "compute")
    assert compute.fitted
    assert compute.value == spent.profile.compute_factor
    assert spent.after.median_pct < spent.before.median_pct
    # The report of a refit with the factor held counts the whole calibration: the first fit's work and the refit's.
    limit = next(v.value for v in full.values if v.name == "memory_bandwidth")
    refit_only = fit_profile(points, catalog=catalog, gpu="h100-sxm", engine="vllm", pinned={"memory_bandwidth": limit})
    assert full.sequence_steps > refit_only.sequence_steps
    assert full.evaluations > refit_only.evaluations
    assert full.profile.fit["sequence_steps"] == full.sequence_steps


def test_vllm_and_aiperf_exports_are_read() -> None:
    doc = {
        "request_rate": 2.0,
        "input_lens": [100, 200, 300],
        "output_lens": [10, 20, 1],
        "ttfts": [0.05, 0.0, 0.07],
        "itls": [[0.01] * 9, [], []],
        "start_times": [1.0, 1.5, 2.0],
        "errors": ["", "timeout", ""],
    }
    records = records_from_vllm_bench(doc)
    assert [(r.start_s, r.input_tokens, r.output_tokens) for r in records] == [(1.0, 100, 10), (2.0, 300, 1)]
    assert records[0].ttft_ms == pytest.approx(50.0)
    assert records[0].latency_ms == pytest.approx(140.0)
    assert records[0].per_token_ms == pytest.approx(10.0)
    line = {
        "metadata": {"request_start_ns": 1_759_813_207_532_900_363, "benchmark_phase": "profiling"},
        "metrics": {
            "input_sequence_length": {"value": 550, "unit": "tokens"},
            "output_sequence_length": {"value": 9, "unit": "tokens"},
            "time_to_first_token": {"value": 255.9, "unit": "ms"},
            "request_latency": {"value": 297.5, "unit": "ms"},
        },
        "error": None,
    }
    failed = {**line, "error": {"code": 499}}
    (record,) = records_from_aiperf([line, failed])
    assert (record.input_tokens, record.output_tokens, record.ttft_ms, record.e2e_ms) == (550, 9, 255.9, 297.5)
    assert record.per_token_ms == pytest.approx((297.5 - 255.9) / 8)


def test_records_give_the_load_they_ran_at() -> None:
    # 100 requests 0.25 s apart, each about 1 s long: an open loop at 4 req/s with constant gaps.
    records = [RequestRecord(i * 0.25, 500, 100, 40.0, e2e_ms=1000.0 + 37 * (i % 7)) for i in range(100)]
    point = point_from_records(records, gpu="h100-sxm", model="llama-3.1-8b", engine="vllm", label="run")
    assert point.request.rate == pytest.approx(4.0)
    assert point.request.arrival == "constant"
    assert point.observed_ms["tpot_mean"] == pytest.approx((sum(37 * (i % 7) for i in range(100)) / 100 + 960) / 99)
    # Eight clients back to back: a closed loop at concurrency 8.
    closed = [RequestRecord(r * 1.0 + c * 0.001, 500, 100, 40.0, e2e_ms=999.0) for r in range(10) for c in range(8)]
    point = point_from_records(closed, gpu="h100-sxm", model="llama-3.1-8b", engine="vllm", label="run")
    assert point.request.concurrency == 8
    with pytest.raises(CalibrationError, match="at least 20"):
        point_from_records(records[:5], gpu="h100-sxm", model="llama-3.1-8b", engine="vllm", label="run")


def test_benchmark_rows_default_missing_columns() -> None:
    rows = [{"model": "Llama-3.1-8B", "isl": "1024", "osl": "128", "concurrency": "4", "ttft_ms": "50", "x": "1"}]
    (point,) = points_from_benchmark_rows(rows, gpu="h100-sxm", engine="vllm")
    request = point.request
    assert (request.model, request.engine, request.tp, request.weight_dtype, request.concurrency) == (
        "llama-3.1-8b",
        "vllm",
        1,
        "bf16",
        4,
    )
    assert point.observed_ms == {"ttft_mean": 50.0}
    other_engine = [{**rows[0], "backend": "sglang"}]
    assert points_from_benchmark_rows(other_engine, gpu="h100-sxm", engine="vllm") == []


def test_a_rows_moe_backend_is_its_column_or_what_its_benchmark_script_set() -> None:
    inferencex = {
        "model": "gpt-oss-120b",
        "backend": "vllm",
        "source_kind": "source_file",
        "isl": "8192",
        "osl": "1024",
    }
    # InferenceX's vLLM gpt-oss scripts for Hopper export VLLM_MXFP4_USE_MARLIN=1.
    assert row_moe_backend(inferencex, "gpt-oss-120b") == "marlin"
    assert row_moe_backend({**inferencex, "moe_backend": "auto"}, "gpt-oss-120b") == "auto"
    assert row_moe_backend({**inferencex, "isl": "4000"}, "gpt-oss-120b") is None
    assert row_moe_backend({**inferencex, "backend": "trtllm"}, "gpt-oss-120b") is None
    assert row_moe_backend({**inferencex, "model": "MiniMax-M2.5"}, "minimax-m2.5") is None
    (point,) = points_from_benchmark_rows(
        [{**inferencex, "precision": "fp4", "tp_size": "2", "concurrency": "4", "ttft_ms": "265"}], gpu="h100-sxm"
    )
    assert point.request.moe_backend == "marlin"


def test_cli_calibrate_writes_a_profile(tmp_path: Path, catalog: Catalog, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "runs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["model", "isl", "osl", "concurrency", "ttft_ms", "tpot_ms"])
        writer.writeheader()
        for point in synthetic_points(catalog):
            r = point.request
            writer.writerow(
                {
                    "model": r.model,
                    "isl": r.isl,
                    "osl": r.osl,
                    "concurrency": r.concurrency,
                    "ttft_ms": point.observed_ms["ttft_mean"],
                    "tpot_ms": point.observed_ms["tpot_mean"],
                }
            )
    out = tmp_path / "profile.yaml"
    fit_argv = ["calibrate", str(path), "-o", str(out), "--gpu", "h100-sxm", "--fit", "memory_bandwidth"]
    assert main([*fit_argv, "--budget-steps", "1000000000"]) == 0
    captured = capsys.readouterr()
    assert "memory_bandwidth" in captured.out
    assert " sequence-steps) in " in captured.out
    assert "wrote the profile" in captured.err
    profile = parse_profile(yaml.safe_load(out.read_text()))
    assert profile.gpu == "h100-sxm"
    assert profile.engine == "vllm"
    assert profile.models == ("llama-3.1-8b",)
    # Compute and the front end stay at their priors, so bandwidth alone absorbs part of their change.
    assert 0.7 < profile.memory_bandwidth_factor < 1.0
    # Records without a model, an empty file, a file of nothing known: one line, exit 2.
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"arrival_s": 0, "input_tokens": 5, "output_tokens": 5, "ttft_ms": 1}) + "\n")
    for argv in (
        ["calibrate", str(records), "-o", str(out), "--gpu", "h100-sxm"],
        ["calibrate", str(tmp_path / "missing.csv"), "-o", str(out), "--gpu", "h100-sxm"],
        ["calibrate", str(records), "-o", str(out), "--gpu", "h100-sxm", "--model", "llama-3.1-8b"],
        [*fit_argv, "--budget-steps", "0"],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("splan: error: "), err
        assert err.count("\n") == 1, err


def test_rows_with_a_prompt_set_replay_it_warm(catalog: Catalog) -> None:
    """inference-perf shared_prefix rows cycle N prompts: a repeat hits the cache whole, arrivals span the stage."""
    row = {
        "model": "llama-3.1-8b",
        "rate": "5",
        "arrival": "poisson",
        "duration_s": "60",
        "num_unique_system_prompts": "3",
        "users_per_system_prompt": "4",
        "isl": "600",
        "osl": "20",
        "ttft_ms": "30",
    }
    (point,) = points_from_benchmark_rows([row], gpu="h100-sxm", engine="vllm")
    assert point.fit_requests is None
    trace = point.request.trace
    assert isinstance(trace, list)
    assert len(trace) == 300
    assert [r["prefix_id"] for r in trace[:14]] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 1]
    gaps = [b["arrival_s"] - a["arrival_s"] for a, b in itertools.pairwise(trace)]
    # 300 gaps rescaled to sum to 60 s; the first request arrives at 0, so the last one a gap before 60 s.
    assert 58.5 < trace[-1]["arrival_s"] < 60.0
    assert max(gaps) > 3 * min(gaps)  # exponential, not even, gaps
    warm = run_estimate(point.request, catalog=catalog).result
    cold = run_estimate(replace(point.request, prefix_caching=False), catalog=catalog).result
    # Only the first round of 12 prompts is prefilled whole; 37 of each later prompt's full blocks come cached.
    assert warm.prefix_hit_tokens == (300 - 12) * 37 * 16
    assert warm.ttft.p50 < 0.8 * cold.ttft.p50
    # A later stage on the same server (`prefix_cache_warm`): the first round finds its prompts cached too.
    (later,) = points_from_benchmark_rows([{**row, "prefix_cache_warm": "true"}], gpu="h100-sxm", engine="vllm")
    assert later.request.prefix_cache_warm
    assert run_estimate(later.request, catalog=catalog).result.prefix_hit_tokens == 300 * 37 * 16
