"""What `splan calibrate` reads: benchmark rows as estimate requests, cycled-prompt traces, kernel tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from service.cli import main
from service.planning import user_calibration as uc
from service.planning.catalog import Catalog
from service.planning.deployment import Mode
from service.planning.kernel_accuracy import predict_gemm
from service.planning.specs import PlanningError

ROW: dict[str, Any] = {"model": "llama-3.1-8b", "isl": "512", "osl": "64", "concurrency": "8"}


def _refusal(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(PlanningError) as refused:
        call(*args, **kwargs)
    return str(refused.value)


@pytest.mark.parametrize(
    ("row", "engine"),
    [
        ({"backend": "vllm", "backend_version": "0.12.1"}, "vllm-0.12"),
        ({"backend": "vllm", "backend_version": "v0.12.0"}, "vllm-0.12"),
        ({"backend": "vllm", "backend_version": "0.14.0"}, "vllm"),
        ({"engine": "sglang", "backend_version": "0.4.0"}, "sglang"),
        ({}, "vllm"),
    ],
)
def test_vllm_before_0_14_is_its_own_engine(row: dict[str, str], engine: str) -> None:
    assert uc.engine_for(row) == engine


@pytest.mark.parametrize(
    ("row", "model", "dtypes"),
    [
        ({"weight_dtype": "fp8", "moe_weight_dtype": "fp4"}, "deepseek-r1", ("fp8", "fp4")),
        ({"weight_dtype": "fp8"}, "llama-3.1-8b", ("fp8", None)),
        ({}, "llama-3.1-8b", ("bf16", None)),
        ({"precision": "fp4"}, "gpt-oss-120b", ("bf16", "mxfp4")),
        ({"precision": "fp8"}, "llama-3.1-8b", ("fp8", None)),
        (
            {"precision": "fp8", "gemm_quant_mode": "fp8_block", "moe_quant_mode": "nvfp4"},
            "deepseek-r1",
            ("fp8", "fp4"),
        ),
        ({"precision": "int4"}, "deepseek-r1", ("bf16", "bf16")),
    ],
)
def test_row_dtypes_from_precision_and_quant_modes(
    row: dict[str, str], model: str, dtypes: tuple[str, str | None]
) -> None:
    assert uc.row_dtypes(row, model) == dtypes


def test_inferencex_shapes_are_drawn_from_a_range() -> None:
    # InferenceX draws lengths in [0.8 x, x] and sends 10 requests per client; aiperf rows are exact.
    ranged = {"isl": "1024", "osl": "8192", "source_kind": "source_file"}
    assert uc.client_lengths(ranged) == ("uniform:819:1024", "uniform:6553:8192", 10)
    assert uc.client_lengths({**ranged, "osl": "1000"}) == ("1024", "1000", None)
    assert uc.client_lengths({"isl": "1024", "osl": "8192"}) == ("1024", "8192", None)


def test_a_cycled_prompt_trace_sends_prompt_k_mod_n_at_its_arrivals() -> None:
    trace = uc.cycled_prompt_trace(
        rate_per_s=2.0, count=5, input_tokens=300, output_tokens=20, prompts=2, arrival="constant"
    )
    assert [r["arrival_s"] for r in trace] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert [r["prefix_id"] for r in trace] == [0, 1, 0, 1, 0]
    assert {(r["input_tokens"], r["output_tokens"], r["prefix_tokens"]) for r in trace} == {(300, 20, 300)}
    gamma = uc.cycled_prompt_trace(
        rate_per_s=4.0, count=4000, input_tokens=10, output_tokens=1, prompts=3, arrival="gamma", cv=2.0, seed=7
    )
    gaps = np.diff([r["arrival_s"] for r in gamma])
    # Gamma gaps of mean 1 / rate and the asked coefficient of variation (4000 draws: within a few percent).
    assert float(np.mean(gaps)) == pytest.approx(0.25, rel=0.1)
    assert float(np.std(gaps) / np.mean(gaps)) == pytest.approx(2.0, rel=0.1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": 0}, "a cycled-prompt trace needs a positive rate, requests and prompts"),
        ({"prompts": 0}, "a cycled-prompt trace needs a positive rate, requests and prompts"),
        ({"rate_per_s": 0.0}, "a cycled-prompt trace needs a positive rate, requests and prompts"),
        ({"arrival": "gamma", "cv": 0.0}, "gamma arrivals need a positive cv"),
        ({"arrival": "bursty"}, "unknown arrival 'bursty' for a cycled-prompt run; use poisson, gamma or constant"),
    ],
)
def test_a_malformed_cycled_prompt_trace_is_refused(kwargs: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {
        "rate_per_s": 1.0,
        "count": 10,
        "input_tokens": 10,
        "output_tokens": 2,
        "prompts": 2,
        "arrival": "poisson",
    }
    assert _refusal(uc.cycled_prompt_trace, **{**base, **kwargs}) == message


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({**ROW, "model": ""}, "a benchmark row needs a model (a `model` column or --model)"),
        ({**ROW, "osl": ""}, "a benchmark row needs the column 'osl'"),
        ({**ROW, "concurrency": "0"}, "a benchmark row needs a load: a `concurrency` or a `rate` (req/s) column"),
        ({**ROW, "prefix_cache_warm": "maybe"}, "column 'prefix_cache_warm' must be true or false (got 'maybe')"),
    ],
)
def test_a_benchmark_row_without_a_model_lengths_or_load_is_refused(row: dict[str, str], message: str) -> None:
    assert _refusal(uc.request_for_benchmark_row, row, gpu="h100-sxm") == message


def test_a_disaggregated_row_becomes_two_pools() -> None:
    row = {
        **ROW,
        "concurrency": "",
        "mode": "disagg",
        "prefill_tp_size": "2",
        "prefill_num_workers": "3",
        "decode_tp_size": "4",
        "decode_num_workers": "2",
        "decode_batch_size": "16",
    }
    request = uc.request_for_benchmark_row(row, gpu="h100-sxm")
    assert request.mode is Mode.DISAGGREGATED
    assert (request.prefill_tp, request.prefill_workers, request.decode_tp, request.decode_workers) == (2, 3, 4, 2)
    # No concurrency column: the decode batch of each decode worker, 16 x 2.
    assert request.concurrency == 32


def test_an_open_loop_row_runs_as_many_requests_as_its_duration_held() -> None:
    row = {**ROW, "concurrency": "", "rate": "2.5", "duration_s": "120"}
    request = uc.request_for_benchmark_row(row, gpu="h100-sxm")
    assert (request.rate, request.arrival, request.requests) == (2.5, "poisson", 300)
    # Clamped to 50..1000 requests.
    assert uc.request_for_benchmark_row({**row, "duration_s": "4"}, gpu="h100-sxm").requests == 50
    assert uc.request_for_benchmark_row({**row, "duration_s": "4000"}, gpu="h100-sxm").requests == 1000


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"results": []}, "a JSON measurement must be a `vllm bench serve --save-detailed` result or a list of rows"),
        ([], "the measurements hold no rows"),
        (["a row"], "each measured row must be a mapping of columns"),
        ([{"latency": 1}], "cannot tell what these measurements are: benchmark rows need isl, osl and concurrency"),
    ],
)
def test_measurements_of_an_unknown_shape_are_refused(content: Any, message: str) -> None:
    assert _refusal(uc.measurement_kind, content).startswith(message)


def test_measurement_kinds() -> None:
    assert uc.measurement_kind({"ttfts": []}) == "vllm"
    assert uc.measurement_kind([{"metrics": {}, "metadata": {}}]) == "aiperf"
    assert uc.measurement_kind([ROW]) == "rows"
    assert uc.measurement_kind([{"input_tokens": 1, "output_tokens": 1, "ttft_ms": 1}]) == "records"


def _gemm_table(catalog: Catalog, slowdown: float) -> np.ndarray:
    """A GEMM table of bf16 shapes timed by the H100 calibration x ``slowdown``."""
    shapes = [("bf16", m, n, k, 0.0) for m in (1, 64, 512, 4096) for n in (1024, 8192) for k in (1024, 8192)]
    rows = np.array(shapes, dtype=[("dtype", "U8"), ("m", "i8"), ("n", "i8"), ("k", "i8"), ("latency_ms", "f8")])
    gpu = catalog.gpu("h100-sxm")
    rows["latency_ms"] = predict_gemm(rows, gpu=gpu, calibration=catalog.calibration_for(gpu)) * 1e3 * slowdown
    return rows


def test_kernel_tables_refit_the_kernels_of_a_slower_gpu(catalog: Catalog) -> None:
    values, summary = uc.fit_kernel_tables({"gemm": _gemm_table(catalog, 1.25)}, catalog=catalog, gpu="h100-sxm")
    assert [(kind, rows) for kind, rows, _, _ in summary] == [("gemm_bf16", 16)]
    _, _, before_pct, after_pct = summary[0]
    # 25% slower than predicted: the catalog's constants are 1 - 1 / 1.25 = 20% off on every shape.
    assert before_pct == pytest.approx(20.0, abs=1e-6)
    assert after_pct < 1.0
    assert set(values["gemm_peak_efficiency"]) >= {"bf16"}
    assert all(isinstance(v, float) for v in values["gemm_peak_efficiency"].values())


def test_kernel_tables_need_eight_rows(catalog: Catalog) -> None:
    few = {"gemm": _gemm_table(catalog, 1.0)[:7]}
    with pytest.raises(uc.CalibrationError, match="at least 8 per table"):
        uc.fit_kernel_tables(few, catalog=catalog, gpu="h100-sxm")


def test_cli_calibrates_kernels_alone(catalog: Catalog, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "my_h100_gemm.csv"
    rows = _gemm_table(catalog, 1.25)
    np.savetxt(
        table, rows, delimiter=",", fmt=["%s", "%d", "%d", "%d", "%.9g"], header="dtype,m,n,k,latency_ms", comments=""
    )
    out = tmp_path / "profile.yaml"
    assert main(["calibrate", str(table), "--gpu", "h100-sxm", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["kernel", "gemm_bf16", "16", "rows:", "median", "error"]
    assert lines[0].split()[6:8] == ["20.0%", "->"]
    assert lines[-1] == "calibrated h100-sxm kernels on 1 tables (no end-to-end measurements: factors stay 1)"
    profile = yaml.safe_load(out.read_text())
    assert profile["gpu"] == "h100-sxm"
    assert "gemm_peak_efficiency" in str(profile)
    unwritable = tmp_path / "no" / "profile.yaml"
    assert main(["calibrate", str(table), "--gpu", "h100-sxm", "--out", str(unwritable)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == f"splan: error: cannot write the profile to {unwritable}: No such file or directory"
