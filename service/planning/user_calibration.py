"""Fit a calibration profile on a user's own measurements (benchmark rows or per-request records).

Pure: callers hand in records already read from disk. Each measured operating point is simulated as
`splan estimate` would; scipy's bounded least squares moves a few physical factors (achieved compute and
memory-bandwidth fractions, collective bandwidth, the engine's CPU costs) to match the measured latencies.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from service.planning.catalog import Catalog
from service.planning.deployment import Mode
from service.planning.estimate import EstimateRequest, run_estimate
from service.planning.moe_cost import MARLIN_BACKEND
from service.planning.profile import (
    ENGINE_CONSTANTS,
    FACTOR_NAMES,
    MIN_FACTOR,
    Profile,
    apply_profile,
    factor_upper_bounds,
)
from service.planning.specs import PlanningError
from service.planning.workload import LengthDistribution

FloatArray = npt.NDArray[np.float64]


class CalibrationError(PlanningError):
    """A fit refused: too little or degenerate data, or one that needs unphysical values."""


# ---------------------------------------------------------------------------------------------------------------
# Benchmark rows -> estimate requests (shared with bench/e2e_accuracy.py)
# ---------------------------------------------------------------------------------------------------------------

# Model names as benchmark exports spell them -> catalog names.
MODEL_ALIASES = {
    "qwen3-32b": "qwen3-32b",
    "llama-3.1-8b-instruct": "llama-3.1-8b",
    "llama-3.1-8b": "llama-3.1-8b",
    "llama-3.1-70b": "llama-3.1-70b",
    "deepseek-r1": "deepseek-r1",
    "deepseek-v3": "deepseek-v3",
    "minimax-m2.5": "minimax-m2.5",
    "qwen3-235b-a22b-fp8": "qwen3-235b-a22b",
    "gpt-oss-120b": "gpt-oss-120b",
    "meta-llama/llama-2-7b-hf": "llama-2-7b",
    "meta-llama/llama-2-70b-hf": "llama-2-70b",
    "mistralai/mixtral-8x7b-v0.1": "mixtral-8x7b",
    "codellama/codellama-34b-instruct-hf": "codellama-34b",
}
MOE_MODELS = frozenset({"deepseek-r1", "deepseek-v3", "minimax-m2.5", "qwen3-235b-a22b", "gpt-oss-120b"})
# InferenceX (SemiAnalysisAI/InferenceX, benchmarks/benchmark_lib.sh and utils/bench_serving/benchmark_serving.py at
# 843c625): ISL/OSL 1k/1k, 1k/8k, 8k/1k; `--random-range-ratio 0.8` draws each request's input and output length
# uniformly from [int(0.8 L), L]; `--num-prompts 10 x CONC --max-concurrency CONC --request-rate inf --ignore-eos`
# after 2 x CONC warm-up requests. The dated CSV exports (`source_kind` source_file) are these sweeps.
INFERENCEX_SHAPES = frozenset({(1024, 1024), (1024, 8192), (8192, 1024)})
INFERENCEX_RANGE_RATIO = 0.8
INFERENCEX_REQUESTS_PER_CLIENT = 10
# Measured metric -> the column names that carry it (first present wins), all milliseconds.
OBSERVED_COLUMNS: dict[str, tuple[str, ...]] = {
    "ttft_mean": ("ttft_ms", "ttft_mean_ms", "mean_ttft_ms"),
    "ttft_p50": ("ttft_p50_ms", "ttft_median_ms", "median_ttft_ms"),
    "ttft_p90": ("ttft_p90_ms", "p90_ttft_ms"),
    "ttft_p99": ("ttft_p99_ms", "p99_ttft_ms"),
    "tpot_mean": ("tpot_ms", "tpot_mean_ms", "mean_tpot_ms"),
    "e2e_mean": ("e2e_ms", "e2e_mean_ms", "mean_e2el_ms"),
    "e2e_p50": ("e2e_p50_ms", "e2e_median_ms", "median_e2el_ms"),
    "e2e_p90": ("e2e_p90_ms", "p90_e2el_ms"),
}
# Weight of each metric's log error in the fit: means lead, tails (noisier) follow.
METRIC_WEIGHTS = {
    "ttft_mean": 1.0,
    "ttft_p50": 0.5,
    "ttft_p90": 0.5,
    "ttft_p99": 0.3,
    "tpot_mean": 1.0,
    "e2e_mean": 1.0,
    "e2e_p50": 0.5,
    "e2e_p90": 0.3,
}
_RATE_COLUMNS = ("rate", "rate_req_s", "request_rate")
# inference-perf `shared_prefix` data (kubernetes-sigs/inference-perf, inference_perf/datagen/shared_prefix_datagen.py
# at 4ad7d4b, 2026-02-14): num_groups x num_prompts_per_group distinct prompts (a group's system prompt + a question),
# request k sends prompt k mod N (load_lazy_data) and every load stage starts again at prompt 0 (run_stage calls
# get_data() anew), so each prompt recurs whole every N requests. The columns as its config and exports name them.
PROMPT_GROUP_COLUMNS = ("num_unique_system_prompts", "num_groups")
PROMPTS_PER_GROUP_COLUMNS = ("users_per_system_prompt", "num_users_per_system_prompt", "num_prompts_per_group")
# Most requests a row's cycled-prompt trace simulates: the first N of them find a cold cache (as a run's first
# stage does), so fewer would overstate the cold share; more costs time in every fit evaluation.
CYCLED_TRACE_MAX_REQUESTS = 3000


def _get(row: Mapping[str, Any], *names: str) -> str:
    """The first non-empty value among ``names`` as text ('' when none)."""
    for name in names:
        value = row.get(name)
        if value is not None and str(value).strip() not in ("", "nan", "None"):
            return str(value).strip()
    return ""


def _flag(value: str, column: str) -> bool:
    """A yes/no cell: 1/0, true/false, yes/no (empty: no)."""
    text = value.strip().lower()
    if text in ("", "0", "false", "no"):
        return False
    if text in ("1", "true", "yes"):
        return True
    raise PlanningError(f"column {column!r} must be true or false (got {value!r})")


def _int(value: str) -> int:
    return int(float(value)) if value else 0


def catalog_model_name(name: str) -> str:
    """Catalog name of a model as a benchmark export spells it."""
    key = name.strip().lower()
    return MODEL_ALIASES.get(key, key)


def engine_for(row: Mapping[str, Any], default: str = "vllm") -> str:
    """The catalog engine of a run: vLLM before 0.14 schedules synchronously."""
    backend = _get(row, "backend", "engine") or default
    version = _get(row, "backend_version")
    # "v0.12.0" and "0.12.0" are the same release.
    numbers = tuple(int(p) for p in version.strip().lstrip("vV").split(".")[:2] if p.isdigit()) if version else ()
    if backend == "vllm" and numbers and numbers < (0, 14):
        return "vllm-0.12"
    return backend


def row_dtypes(row: Mapping[str, Any], model: str) -> tuple[str, str | None]:
    """(dense weight dtype, expert weight dtype) of a run from its precision and quant-mode columns."""
    if _get(row, "weight_dtype"):
        return _get(row, "weight_dtype"), _get(row, "moe_weight_dtype") or None
    precision = _get(row, "precision") or "unrecorded"
    if precision == "unrecorded":
        return "bf16", None
    if precision == "fp4" and model.startswith("gpt-oss"):
        # gpt-oss ships mxfp4 experts with bf16 attention; on Hopper vLLM runs the experts weight-only.
        return "bf16", "mxfp4"
    gemm = _get(row, "gemm_quant_mode") or precision
    moe = _get(row, "moe_quant_mode") or gemm
    names = {"fp8": "fp8", "fp8_block": "fp8", "nvfp4": "fp4", "fp4": "fp4"}
    return names.get(gemm, "bf16"), names.get(moe, "bf16") if model in MOE_MODELS else None


def _pool(row: Mapping[str, Any], prefix: str) -> dict[str, int | None]:
    """Layout fields of one pool (prefix '' for collocated rows, 'prefill_' or 'decode_')."""
    tp = _int(_get(row, f"{prefix}tp_size", f"{prefix}tp")) or 1
    dp = _int(_get(row, f"{prefix}attention_dp_size")) or 1
    moe_tp = _int(_get(row, f"{prefix}moe_tp_size"))
    moe_ep = _int(_get(row, f"{prefix}moe_ep_size"))
    if moe_tp * moe_ep != tp * dp:
        # Layout not recorded (older rows) or inconsistent: the engine's default, experts cut like attention.
        moe_tp, moe_ep = 0, 1
    return {
        "tp": tp,
        "pp": _int(_get(row, f"{prefix}pp_size", f"{prefix}pp")) or 1,
        "attention_dp": dp,
        "moe_tp": moe_tp or None,
        "moe_ep": moe_ep or 1,
    }


def inferencex_row(row: Mapping[str, Any]) -> bool:
    """Whether a reference row is an InferenceX sweep point (a dated CSV export in one of its shapes)."""
    isl, osl = round(float(_get(row, "isl"))), round(float(_get(row, "osl")))
    return _get(row, "source_kind") == "source_file" and (isl, osl) in INFERENCEX_SHAPES


def row_moe_backend(row: Mapping[str, Any], model: str) -> str | None:
    """The MoE kernels a run forced: its `moe_backend` column, or what its public benchmark script sets."""
    if _get(row, "moe_backend"):
        return _get(row, "moe_backend")
    if model.startswith("gpt-oss") and _get(row, "backend") == "vllm" and inferencex_row(row):
        # InferenceX's vLLM gpt-oss scripts for Hopper export VLLM_MXFP4_USE_MARLIN=1 since SemiAnalysisAI/InferenceX
        # 4e52ed4c6 (2026-01-02; still in benchmarks/single_node/gptoss_fp4_h100.sh at cec542a9a, 2026-03-27). Its
        # 2025 sweeps ran vLLM 0.10.2, which fell back to Marlin where triton_kernels was not installed (it became a
        # dependency with vllm-project/vllm #27370, opened 2025-10-22). Marlin, not today's Triton default.
        return MARLIN_BACKEND
    return None


def client_lengths(row: Mapping[str, Any]) -> tuple[str, str, int | None]:
    """(isl, osl, requests per client) as the row's benchmark client drew them."""
    isl, osl = round(float(_get(row, "isl"))), round(float(_get(row, "osl")))
    if inferencex_row(row):

        def ranged(tokens: int) -> str:
            return f"uniform:{int(tokens * INFERENCEX_RANGE_RATIO)}:{tokens}"

        return ranged(isl), ranged(osl), INFERENCEX_REQUESTS_PER_CLIENT
    # The other rows come from aiperf sweeps with exact lengths (docs/ENGINES.md).
    return str(isl), str(osl), None


def prompt_pool_size(row: Mapping[str, Any]) -> int:
    """Distinct prompts a run cycles through (groups x prompts per group), 0 when the row does not say."""
    groups = _int(_get(row, *PROMPT_GROUP_COLUMNS))
    per_group = _int(_get(row, *PROMPTS_PER_GROUP_COLUMNS))
    return groups * per_group if groups > 0 and per_group > 0 else 0


def cycled_prompt_trace(
    *,
    rate_per_s: float,
    count: int,
    input_tokens: int,
    output_tokens: int,
    prompts: int,
    arrival: str,
    cv: float = 1.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Trace records of ``count`` requests sending prompt k mod ``prompts`` whole, arriving by ``arrival``."""
    # A repeated prompt is one prefix group as long as the prompt: a warm cache serves all its full KV blocks.
    # Poisson gaps are rescaled to span count / rate seconds, as inference-perf's `constant` load timer draws them
    # (inference_perf/loadgen/load_timer.py ConstantLoadTimer: exponential intervals normalised to the duration).
    if count < 1 or prompts < 1 or not rate_per_s > 0:
        raise PlanningError("a cycled-prompt trace needs a positive rate, requests and prompts")
    rng = np.random.default_rng([seed, 0xC7C1E])
    if arrival == "constant":
        gaps = np.full(count, 1.0 / rate_per_s)
    elif arrival == "poisson":
        drawn = rng.exponential(1.0, count)
        gaps = drawn * (count / rate_per_s) / float(drawn.sum())
    elif arrival == "gamma":
        if not cv > 0:
            raise PlanningError("gamma arrivals need a positive cv")
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (shape * rate_per_s), count)
    else:
        raise PlanningError(f"unknown arrival {arrival!r} for a cycled-prompt run; use poisson, gamma or constant")
    starts = np.cumsum(gaps) - gaps[0]
    return [
        {
            "arrival_s": float(t),
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "prefix_id": k % prompts,
            "prefix_tokens": input_tokens,
        }
        for k, t in enumerate(starts)
    ]


def request_for_benchmark_row(
    row: Mapping[str, Any],
    *,
    gpu: str,
    model: str | None = None,
    engine: str | None = None,
    client_start: str = "benchmark",
    defaults: Mapping[str, Any] | None = None,
) -> EstimateRequest:
    """The estimate request that reproduces one measured benchmark row (e2e_h100_sxm.csv columns).

    Optional columns missing from the row are defaulted: collocated, TP1/PP1, bf16, the engine's knobs.
    ``defaults`` holds EstimateRequest fields that a row cannot override (the CLI's --tp etc. go into the row).
    """
    name = catalog_model_name(model or _get(row, "model"))
    if not name:
        raise PlanningError("a benchmark row needs a model (a `model` column or --model)")
    for column in ("isl", "osl"):
        if not _get(row, column):
            raise PlanningError(f"a benchmark row needs the column {column!r}")
    weight, moe_weight = row_dtypes(row, name)
    isl, osl, requests_per_client = client_lengths(row)
    common: dict[str, Any] = {
        "model": name,
        "gpu": gpu,
        "engine": engine or engine_for(row),
        "weight_dtype": weight,
        "moe_weight_dtype": moe_weight,
        "isl": isl,
        "osl": osl,
        "client_start": client_start,
        "requests_per_client": requests_per_client,
        "max_batched_tokens": _int(_get(row, "max_num_batched_tokens", "max_batched_tokens")) or None,
        "max_sequences": _int(_get(row, "max_num_seqs", "max_seqs")) or None,
        "moe_backend": row_moe_backend(row, name),
        # A run on a server that had served the same prompts before (a benchmark's later stage) finds them cached.
        "prefix_cache_warm": _flag(_get(row, "prefix_cache_warm"), "prefix_cache_warm"),
        **(defaults or {}),
    }
    rate = float(_get(row, *_RATE_COLUMNS) or 0.0)
    concurrency = _int(_get(row, "concurrency")) or _int(_get(row, "batch_size"))
    if _get(row, "mode") == "disagg":
        workers = _int(_get(row, "decode_num_workers")) or 1
        concurrency = concurrency or _int(_get(row, "decode_batch_size")) * workers
        prefill, decode = _pool(row, "prefill_"), _pool(row, "decode_")
        return EstimateRequest(
            **common,
            mode=Mode.DISAGGREGATED,
            prefill_tp=int(prefill["tp"] or 1),
            prefill_pp=int(prefill["pp"] or 1),
            prefill_attention_dp=int(prefill["attention_dp"] or 1),
            prefill_moe_tp=prefill["moe_tp"],
            prefill_moe_ep=int(prefill["moe_ep"] or 1),
            prefill_workers=_int(_get(row, "prefill_num_workers")) or 1,
            decode_tp=int(decode["tp"] or 1),
            decode_pp=int(decode["pp"] or 1),
            decode_attention_dp=int(decode["attention_dp"] or 1),
            decode_moe_tp=decode["moe_tp"],
            decode_moe_ep=int(decode["moe_ep"] or 1),
            decode_workers=workers,
            concurrency=concurrency,
        )
    pool = _pool(row, "")
    load: dict[str, Any]
    if concurrency:
        load = {"concurrency": concurrency}
    elif rate > 0:
        arrival = _get(row, "arrival") or "poisson"
        kind = "constant" if arrival.startswith("constant") else arrival
        load = {"rate": rate, "arrival": kind}
        duration_s = float(_get(row, "duration_s") or 0.0)
        prompts = prompt_pool_size(row)
        if prompts:
            # The run repeated a fixed set of prompts (inference-perf shared_prefix): replay that order, exact lengths.
            count = round(rate * duration_s) if duration_s > 0 else CYCLED_TRACE_MAX_REQUESTS
            trace = cycled_prompt_trace(
                rate_per_s=rate,
                count=max(50, min(CYCLED_TRACE_MAX_REQUESTS, count)),
                input_tokens=round(float(_get(row, "isl"))),
                output_tokens=round(float(_get(row, "osl"))),
                prompts=prompts,
                arrival=kind,
                cv=float(_get(row, "cv") or 1.0),
                seed=int(common.get("seed", 0)),
            )
            common.update(isl=None, osl=None, requests_per_client=None)
            load = {"trace": trace, "time_scale": 1.0}
        elif duration_s > 0:
            load["requests"] = max(50, min(1000, round(rate * duration_s)))
    else:
        raise PlanningError("a benchmark row needs a load: a `concurrency` or a `rate` (req/s) column")
    layout = {
        "tp": int(pool["tp"] or 1),
        "pp": int(pool["pp"] or 1),
        "attention_dp": int(pool["attention_dp"] or 1),
        "moe_tp": pool["moe_tp"],
        "moe_ep": int(pool["moe_ep"] or 1),
    }
    return EstimateRequest(**{**layout, **common, **load})


def observed_from_row(row: Mapping[str, Any]) -> dict[str, float]:
    """The measured latencies (ms) a row carries, by metric name; zero or empty means not recorded."""
    out: dict[str, float] = {}
    for metric, columns in OBSERVED_COLUMNS.items():
        text = _get(row, *columns)
        if text:
            value = float(text)
            if value > 0 and math.isfinite(value):
                out[metric] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# Measured points
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MeasuredPoint:
    """One measured operating point: the request that reproduces it and what was measured (ms)."""

    request: EstimateRequest
    observed_ms: dict[str, float]
    label: str
    # Rows of one group (model, engine, mode) are spread evenly when the fit subsamples.
    group: str = ""
    # Requests simulated while fitting (fewer than the report's, for speed); None keeps the request's own.
    fit_requests: int | None = None


def points_from_benchmark_rows(
    rows: Sequence[Mapping[str, Any]],
    *,
    gpu: str,
    model: str | None = None,
    engine: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    source: str = "rows",
) -> list[MeasuredPoint]:
    """Measured points from end-to-end benchmark rows (one point per row with a measured latency).

    With ``engine`` given, rows that name another backend are left out (a profile is fitted per engine).
    """
    points = []
    for i, row in enumerate(rows):
        observed = observed_from_row(row)
        if not observed:
            continue
        if engine and _get(row, "backend", "engine") and engine_for(row) != engine:
            continue
        try:
            request = request_for_benchmark_row(row, gpu=gpu, model=model, engine=engine, defaults=defaults)
        except (ValueError, KeyError) as exc:
            raise PlanningError(f"{source} row {i + 1}: {exc}") from None
        concurrency = request.concurrency or 0
        fit_requests: int | None = max(32, 4 * concurrency) if concurrency else min(request.requests or 600, 300)
        if request.trace is not None:
            # A replayed run keeps its own requests: fewer would change which prompts find a warm cache, and cut
            # short the queue a loaded stage builds.
            fit_requests = None
        group = f"{request.model}/{request.engine}/{request.mode.value}"
        points.append(MeasuredPoint(request, observed, f"{source}:{i + 1}", group=group, fit_requests=fit_requests))
    return points


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request of a measured run."""

    start_s: float
    input_tokens: int
    output_tokens: int
    ttft_ms: float
    # At least one of these two is known; the other is derived.
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    # Records with the same key come from one load stage (a `stage`/`run` column), else one run.
    stage: str = ""

    @property
    def latency_ms(self) -> float:
        """End-to-end latency: measured, else TTFT plus one TPOT per token after the first."""
        if self.e2e_ms is not None:
            return self.e2e_ms
        return self.ttft_ms + (self.tpot_ms or 0.0) * max(0, self.output_tokens - 1)

    @property
    def per_token_ms(self) -> float | None:
        """TPOT: measured, else from the latency after the first token (None for one-token outputs)."""
        if self.tpot_ms is not None:
            return self.tpot_ms
        if self.output_tokens < 2 or self.e2e_ms is None:
            return None
        return (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1)


_START_COLUMNS = ("arrival_s", "arrival_time", "arrival", "start_s", "start_time", "timestamp", "request_start_s")
_INPUT_COLUMNS = ("input_tokens", "prompt_tokens", "input_len", "prompt_len", "isl", "input_length")
_OUTPUT_COLUMNS = ("output_tokens", "completion_tokens", "output_len", "osl", "output_length")
# (column, factor to milliseconds)
_TTFT_COLUMNS = (("ttft_ms", 1.0), ("ttft_s", 1e3), ("ttft", 1e3), ("time_to_first_token_ms", 1.0))
_TPOT_COLUMNS = (("tpot_ms", 1.0), ("tpot_s", 1e3), ("itl_ms", 1.0))
_E2E_COLUMNS = (("e2e_ms", 1.0), ("latency_ms", 1.0), ("e2e_s", 1e3), ("latency_s", 1e3), ("latency", 1e3))


def _scaled_value(row: Mapping[str, Any], columns: Iterable[tuple[str, float]]) -> float | None:
    for name, factor in columns:
        text = _get(row, name)
        if text:
            return float(text) * factor
    return None


def records_from_vllm_bench(doc: Mapping[str, Any]) -> list[RequestRecord]:
    """Records of a `vllm bench serve --save-result --save-detailed` JSON (vllm/benchmarks/serve.py).

    Per request: input_lens, output_lens, ttfts (s), itls (lists, s), and in newer versions latencies (s)
    and start_times (s); failed requests carry an error and are skipped.
    """
    n = len(doc.get("ttfts") or [])
    if not n or len(doc.get("input_lens") or []) != n or len(doc.get("output_lens") or []) != n:
        raise PlanningError("a vLLM result needs ttfts, input_lens and output_lens of one length (--save-detailed)")
    errors = doc.get("errors") or [""] * n
    latencies = doc.get("latencies") or [None] * n
    itls = doc.get("itls") or [None] * n
    starts = doc.get("start_times")
    rate = float(doc.get("request_rate") or 0.0) if str(doc.get("request_rate", "")) not in ("inf", "") else 0.0
    out = []
    for i in range(n):
        ttft_s = doc["ttfts"][i]
        if errors[i] or not ttft_s:
            continue
        latency_s = latencies[i]
        if latency_s is None and itls[i] is not None:
            latency_s = float(ttft_s) + float(sum(itls[i]))
        # Older exports have no start times: the configured rate spaces the requests evenly.
        start = float(starts[i]) if starts is not None else (i / rate if rate > 0 else 0.0)
        out.append(
            RequestRecord(
                start_s=start,
                input_tokens=int(doc["input_lens"][i]),
                output_tokens=int(doc["output_lens"][i]),
                ttft_ms=float(ttft_s) * 1e3,
                e2e_ms=None if latency_s is None else float(latency_s) * 1e3,
            )
        )
    return out


def records_from_aiperf(lines: Sequence[Mapping[str, Any]]) -> list[RequestRecord]:
    """Records of an aiperf `profile_export.jsonl` (one {metadata, metrics, error} object per request).

    metadata.request_start_ns; metrics.input_sequence_length, output_sequence_length, time_to_first_token and
    request_latency as {value, unit}; failed or cancelled requests (error set) are skipped.
    """
    out = []
    for line in lines:
        meta = line.get("metadata") or {}
        metrics = line.get("metrics") or {}
        if line.get("error") or meta.get("was_cancelled") or meta.get("benchmark_phase", "profiling") != "profiling":
            continue

        def value(name: str, metrics: Mapping[str, Any] = metrics) -> float | None:
            item = metrics.get(name)
            if not isinstance(item, Mapping) or item.get("value") is None:
                return None
            scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3, "sec": 1e3}.get(str(item.get("unit", "ms")), 1.0)
            return float(item["value"]) * (scale if name in ("time_to_first_token", "request_latency") else 1.0)

        ttft = value("time_to_first_token")
        isl = value("input_sequence_length")
        osl = value("output_sequence_length") or value("output_token_count")
        if ttft is None or isl is None or osl is None or meta.get("request_start_ns") is None:
            continue
        out.append(
            RequestRecord(
                start_s=float(meta["request_start_ns"]) * 1e-9,
                input_tokens=int(isl),
                output_tokens=int(osl),
                ttft_ms=ttft,
                e2e_ms=value("request_latency"),
                tpot_ms=value("inter_token_latency"),
            )
        )
    return out


def records_from_rows(rows: Sequence[Mapping[str, Any]]) -> list[RequestRecord]:
    """Records from plain CSV/JSONL rows: arrival or start time, input and output tokens, TTFT, TPOT or E2E."""
    out = []
    for i, row in enumerate(rows):
        start = _get(row, *_START_COLUMNS)
        isl = _get(row, *_INPUT_COLUMNS)
        osl = _get(row, *_OUTPUT_COLUMNS)
        ttft = _scaled_value(row, _TTFT_COLUMNS)
        if not (isl and osl) or ttft is None:
            raise PlanningError(
                f"record {i + 1} needs input and output tokens and a TTFT; columns found: {', '.join(sorted(row))}"
            )
        tpot = _scaled_value(row, _TPOT_COLUMNS)
        e2e = _scaled_value(row, _E2E_COLUMNS)
        if tpot is None and e2e is None:
            raise PlanningError(f"record {i + 1} needs a TPOT or an end-to-end latency (tpot_ms, e2e_ms)")
        out.append(
            RequestRecord(
                start_s=float(start) if start else float(i),
                input_tokens=int(float(isl)),
                output_tokens=int(float(osl)),
                ttft_ms=ttft,
                tpot_ms=tpot,
                e2e_ms=e2e,
                stage=_get(row, "stage", "run", "experiment"),
            )
        )
    if out and not any(_get(row, *_START_COLUMNS) for row in rows):
        raise PlanningError(f"records need an arrival or start time column (one of {', '.join(_START_COLUMNS)})")
    return out


def measurement_kind(content: Any) -> str:
    """What a parsed measurement file holds: `vllm`, `aiperf`, `rows` (benchmark rows) or `records`."""
    if isinstance(content, Mapping):
        if "ttfts" in content:
            return "vllm"
        raise PlanningError("a JSON measurement must be a `vllm bench serve --save-detailed` result or a list of rows")
    if not isinstance(content, list) or not content:
        raise PlanningError("the measurements hold no rows")
    first = content[0]
    if not isinstance(first, Mapping):
        raise PlanningError("each measured row must be a mapping of columns")
    if "metrics" in first and "metadata" in first:
        return "aiperf"
    columns = set(first)
    if {"isl", "osl"} <= columns and columns & {"concurrency", "batch_size", *_RATE_COLUMNS}:
        return "rows"
    if columns & set(_INPUT_COLUMNS):
        return "records"
    raise PlanningError(
        "cannot tell what these measurements are: benchmark rows need isl, osl and concurrency or rate columns, "
        f"per-request records input_tokens, output_tokens and ttft_ms; columns found: {', '.join(sorted(columns))}"
    )


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def point_from_records(
    records: Sequence[RequestRecord],
    *,
    gpu: str,
    model: str,
    engine: str,
    label: str,
    defaults: Mapping[str, Any] | None = None,
    max_requests: int = 2000,
) -> MeasuredPoint:
    """One measured point from the requests of one run (or stage): its load, lengths and latency statistics.

    The load is read from the arrivals: a closed loop when the in-flight count sits at its maximum, else the
    arrival rate with the measured spread of the gaps (a gamma process of that coefficient of variation).
    Lengths are resampled from the run's own input and output tokens.
    """
    if len(records) < 20:
        raise CalibrationError(f"{label}: {len(records)} usable requests; a run needs at least 20 to calibrate on")
    ordered = sorted(records, key=lambda r: r.start_s)
    starts = np.array([r.start_s for r in ordered])
    ends = starts + np.array([r.latency_ms for r in ordered]) / 1e3
    # In flight when each request starts (itself included).
    in_flight = np.array([int(np.sum((starts <= s) & (ends > s))) for s in starts])
    peak = int(in_flight.max())
    load: dict[str, Any]
    # A closed loop's client sends its next request as the previous one ends: most starts follow an end closely.
    tolerance_s = max(0.005, 0.01 * float(np.median(ends - starts)))
    later = starts[starts > starts[0] + tolerance_s]
    follows = np.array([np.any(np.abs(ends - s) <= tolerance_s) for s in later]) if later.size else np.zeros(0)
    if peak > 1 and np.mean(in_flight >= peak - 1) >= 0.8 and follows.size and np.mean(follows) >= 0.8:
        load = {"concurrency": peak, "client_start": "burst"}
    else:
        gaps = np.diff(starts)
        span_s = float(starts[-1] - starts[0])
        if span_s <= 0:
            raise CalibrationError(f"{label}: every request starts at the same time; give start times")
        rate = (len(ordered) - 1) / span_s
        cv = float(np.std(gaps) / np.mean(gaps)) if np.mean(gaps) > 0 else 1.0
        if cv < 0.05:
            load = {"rate": rate, "arrival": "constant"}
        else:
            load = {"rate": rate, "arrival": "gamma", "cv": min(max(cv, 0.05), 20.0)}
    isl = LengthDistribution.from_samples([max(1, r.input_tokens) for r in ordered])
    osl = LengthDistribution.from_samples([max(1, r.output_tokens) for r in ordered])
    ttfts = [r.ttft_ms for r in ordered]
    e2es = [r.latency_ms for r in ordered]
    tpots = [t for t in (r.per_token_ms for r in ordered) if t is not None]
    observed = {
        "ttft_mean": statistics.fmean(ttfts),
        "ttft_p50": _percentile(ttfts, 50),
        "ttft_p90": _percentile(ttfts, 90),
        "ttft_p99": _percentile(ttfts, 99),
        "e2e_mean": statistics.fmean(e2es),
        "e2e_p50": _percentile(e2es, 50),
        "e2e_p90": _percentile(e2es, 90),
    }
    if tpots:
        observed["tpot_mean"] = statistics.fmean(tpots)
    request = EstimateRequest(
        model=catalog_model_name(model),
        gpu=gpu,
        engine=engine,
        isl=isl,
        osl=osl,
        requests=min(len(ordered), max_requests),
        **load,
        **(defaults or {}),
    )
    return MeasuredPoint(request, observed, label, group=label, fit_requests=min(len(ordered), 400))


def points_from_records(
    records: Sequence[RequestRecord],
    *,
    gpu: str,
    model: str,
    engine: str,
    source: str,
    defaults: Mapping[str, Any] | None = None,
) -> list[MeasuredPoint]:
    """One measured point per stage of the records (all of them when they name no stage)."""
    stages: dict[str, list[RequestRecord]] = {}
    for record in records:
        stages.setdefault(record.stage, []).append(record)
    return [
        point_from_records(
            group,
            gpu=gpu,
            model=model,
            engine=engine,
            label=f"{source}:{stage}" if stage else source,
            defaults=defaults,
        )
        for stage, group in stages.items()
    ]


# ---------------------------------------------------------------------------------------------------------------
# The fit
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FitParameter:
    """One fitted quantity: how it maps to the fit's variable x, its bounds and a meaningful change of x."""

    name: str
    # factor: x = ln(value); seconds: x = value / unit_s.
    kind: str
    unit_s: float = 1.0
    upper_s: float = 0.0
    # Forward-difference step of x, and the change of x that matters physically (identifiability).
    step: float = 0.05
    meaningful: float = 0.1
    what: str = ""


PARAMETERS: dict[str, FitParameter] = {
    "memory_bandwidth": FitParameter("memory_bandwidth", "factor", what="achieved HBM bandwidth x calibrated"),
    "compute": FitParameter("compute", "factor", what="achieved tensor-core FLOP/s x calibrated"),
    "request_overhead_s": FitParameter(
        "request_overhead_s", "seconds", unit_s=1e-2, upper_s=5.0, step=0.5, meaningful=1.0, what="API latency"
    ),
    "step_overhead_s": FitParameter(
        "step_overhead_s", "seconds", unit_s=1e-3, upper_s=0.05, step=0.2, meaningful=1.0, what="CPU per step"
    ),
    "per_sequence_overhead_s": FitParameter(
        "per_sequence_overhead_s",
        "seconds",
        unit_s=1e-5,
        upper_s=2e-3,
        step=0.5,
        meaningful=1.0,
        what="CPU per sequence per step",
    ),
    "step_gap_s": FitParameter(
        "step_gap_s", "seconds", unit_s=1e-3, upper_s=0.05, step=0.2, meaningful=1.0, what="GPU idle per step"
    ),
    "collective_bandwidth": FitParameter(
        "collective_bandwidth", "factor", what="achieved collective bus bandwidth x calibrated"
    ),
}
# Order of preference when two parameters cannot be told apart: GPU physics before engine constants.
PRIORITY = tuple(PARAMETERS)
# A meaningful change of a parameter must move the predictions by this much (RMS of log errors) to be fitted.
MIN_SENSITIVITY = 0.005
# The part of a parameter's effect not explained by parameters already chosen (sine of the angle) must exceed this.
MIN_INDEPENDENCE = 0.15
# The fit's own budget: with start-up, reading the rows, the report and the simulation under way at the deadline,
# a calibration on 1,000 rows ends within 30 s.
DEFAULT_TIME_BUDGET_S = 20.0
DEFAULT_MAX_POINTS = 48
# Noise of a measured metric in log space (about 5%): the soft-L1 loss treats larger residuals as outliers.
RESIDUAL_SCALE = 0.05
# How far a calibrated efficiency is believed off before any measurement (log space): a quarter either way. The
# prior is one residual row per fitted parameter, so a run or two cannot drag a factor far with an unmodelled tail
# while many runs outweigh it.
PRIOR_FACTOR_LOG_SIGMA = 0.25
# A fitted value this close to a bound (relative) sits on it: a fit stopped by its budget or pulled by the prior
# comes to rest a hair inside.
LIMIT_TOLERANCE = 5e-3


@dataclass(frozen=True, slots=True)
class FittedValue:
    """One parameter's outcome."""

    name: str
    prior: float
    value: float
    lower: float
    upper: float
    # One standard deviation of the value (from the Jacobian at the solution); nan when not estimated.
    sigma: float
    fitted: bool
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out: dict[str, Any] = {
            "prior": float(f"{self.prior:.6g}"),
            "value": float(f"{self.value:.6g}"),
            "bounds": [float(f"{self.lower:.6g}"), float(f"{self.upper:.6g}")],
            "fitted": self.fitted,
        }
        if self.fitted and math.isfinite(self.sigma):
            out["sigma"] = float(f"{self.sigma:.3g}")
        if self.note:
            out["note"] = self.note
        return out


@dataclass(frozen=True, slots=True)
class ResidualSummary:
    """Absolute % errors over every (point, metric) pair: median and p90, overall and per metric."""

    median_pct: float
    p90_pct: float
    per_metric: dict[str, tuple[float, float]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "median_pct": round(self.median_pct, 2),
            "p90_pct": round(self.p90_pct, 2),
            "per_metric": {
                k: {"median_pct": round(m, 2), "p90_pct": round(p, 2)} for k, (m, p) in self.per_metric.items()
            },
        }


@dataclass(frozen=True, slots=True)
class CalibrationResult:
    """The fitted profile and how the fit went."""

    profile: Profile
    values: tuple[FittedValue, ...]
    before: ResidualSummary
    after: ResidualSummary
    points_total: int
    points_used: int
    evaluations: int
    elapsed_s: float
    notes: tuple[str, ...] = ()
    # Simulated work of the whole fit (one sequence in one engine step is one sequence-step).
    sequence_steps: int = 0


def _summary(errors: Mapping[str, list[float]]) -> ResidualSummary:
    every = [e for values in errors.values() for e in values]
    if not every:
        return ResidualSummary(math.nan, math.nan)
    per = {k: (statistics.median(v), _percentile(v, 90)) for k, v in errors.items() if v}
    return ResidualSummary(statistics.median(every), _percentile(every, 90), per)


def predicted_metrics(estimate_result: Any) -> dict[str, float]:
    """The metrics a simulated run gives, named as OBSERVED_COLUMNS."""
    r = estimate_result
    return {
        "ttft_mean": r.ttft.mean,
        "ttft_p50": r.ttft.p50,
        "ttft_p90": r.ttft.p90,
        "ttft_p99": r.ttft.p99,
        "tpot_mean": r.tpot.mean,
        "e2e_mean": r.e2e.mean,
        "e2e_p50": r.e2e.p50,
        "e2e_p90": r.e2e.p90,
    }


class _BudgetSpentError(Exception):
    """The fit ran out of its time budget."""


@dataclass
class _WorkMeter:
    """Simulated work of a fit so far, in sequence-steps (one sequence in one engine step): a machine-free clock."""

    sequence_steps: int = 0

    def __call__(self) -> float:
        return float(self.sequence_steps)


def spread_order(points: Sequence[MeasuredPoint]) -> list[MeasuredPoint]:
    """The points dealt round-robin over their groups, each group evenly strided: any prefix is a fair subsample."""
    groups: dict[str, list[MeasuredPoint]] = {}
    for point in points:
        groups.setdefault(point.group, []).append(point)
    strided: list[list[MeasuredPoint]] = []
    for members in groups.values():
        # Bit-reversal-like order: first, last, middle, quarters, ... so a short prefix spans the group.
        order: list[int] = []
        seen: set[int] = set()
        parts = 1
        while len(order) < len(members):
            for j in range(parts + 1):
                index = round(j * (len(members) - 1) / parts) if parts else 0
                if index not in seen:
                    seen.add(index)
                    order.append(index)
            parts *= 2
        strided.append([members[i] for i in order])
    out: list[MeasuredPoint] = []
    for depth in range(max(len(s) for s in strided) if strided else 0):
        out.extend(s[depth] for s in strided if depth < len(s))
    return out


# Metrics the API latency (request_overhead_s) adds to as a constant: the simulator adds it to every request's TTFT
# and E2E after the run, and nothing else moves.
ADDITIVE_PARAMETERS = frozenset(("request_overhead_s",))
OVERHEAD_METRICS = frozenset(("ttft_mean", "ttft_p50", "ttft_p90", "ttft_p99", "e2e_mean", "e2e_p50", "e2e_p90"))


class _Evaluator:
    """Simulates the measured points under a parameter vector; caches by vector.

    The API latency is added to the simulated metrics rather than simulated: a change of it alone costs nothing.
    """

    def __init__(
        self,
        points: Sequence[MeasuredPoint],
        *,
        catalog: Catalog,
        base: Profile,
        names: Sequence[str],
        fit_mode: bool,
        meter: _WorkMeter | None = None,
    ) -> None:
        self.points = list(points)
        self.catalog = catalog
        self.base = base
        self.names = list(names)
        self.fit_mode = fit_mode
        self.cache: dict[bytes, tuple[FloatArray, list[dict[str, float]]]] = {}
        # Simulated metrics (None: the estimate was refused) by vector with the API latency at 0.
        self.simulated: dict[bytes, list[dict[str, float] | None]] = {}
        self.additive = self.names.index("request_overhead_s") if "request_overhead_s" in self.names else None
        self.evaluations = 0
        self.point_seconds: list[float] = [0.0] * len(self.points)
        self.point_sequence_steps: list[float] = [0.0] * len(self.points)
        self.meter = meter if meter is not None else _WorkMeter()

    def profile_at(self, x: FloatArray) -> Profile:
        """The profile with the fitted names set from x."""
        return profile_with(
            self.base,
            dict(zip(self.names, (from_x(n, float(v)) for n, v in zip(self.names, x, strict=True)), strict=True)),
        )

    def __call__(self, x: FloatArray) -> FloatArray:
        return self.evaluate(x)[0]

    def evaluate(self, x: FloatArray) -> tuple[FloatArray, list[dict[str, float]]]:
        """Weighted log errors and the predicted metrics of every point."""
        x = np.asarray(x, dtype=np.float64)
        key = x.round(9).tobytes()
        if key in self.cache:
            return self.cache[key]
        overhead_ms = 0.0
        simulated_x = x
        if self.additive is not None:
            overhead_ms = from_x("request_overhead_s", float(x[self.additive])) * 1e3
            simulated_x = x.copy()
            simulated_x[self.additive] = 0.0
        residuals: list[float] = []
        predictions: list[dict[str, float]] = []
        for point, simulated in zip(self.points, self._simulate(simulated_x), strict=True):
            if simulated is None:
                # A refused estimate counts as a miss by a factor of three on every metric.
                predicted = {m: v * 3.0 for m, v in point.observed_ms.items()}
            else:
                predicted = {m: v + overhead_ms if m in OVERHEAD_METRICS else v for m, v in simulated.items()}
            predictions.append(predicted)
            for metric, observed in point.observed_ms.items():
                value = predicted.get(metric, math.nan)
                error = math.log(max(value, 1e-6) / observed) if math.isfinite(value) else math.log(3.0)
                residuals.append(METRIC_WEIGHTS.get(metric, 0.5) * error)
        out = (np.array(residuals, dtype=np.float64), predictions)
        self.cache[key] = out
        return out

    def is_free(self, x: FloatArray) -> bool:
        """Whether evaluating x needs no simulation (it or its simulated part was evaluated)."""
        x = np.asarray(x, dtype=np.float64)
        if x.round(9).tobytes() in self.cache:
            return True
        if self.additive is None:
            return False
        simulated_x = x.copy()
        simulated_x[self.additive] = 0.0
        return simulated_x.round(9).tobytes() in self.simulated

    def _simulate(self, x: FloatArray) -> list[dict[str, float] | None]:
        """Every point's simulated metrics at x (None where the estimate is refused); cached by vector."""
        key = x.round(9).tobytes()
        if key in self.simulated:
            return self.simulated[key]
        profile = self.profile_at(x)
        out: list[dict[str, float] | None] = []
        for i, point in enumerate(self.points):
            started = time.perf_counter()
            request = point.request
            if self.fit_mode and point.fit_requests is not None:
                request = replace(request, requests=point.fit_requests)
            predicted: dict[str, float] | None
            try:
                catalog, _ = apply_profile(
                    self.catalog, profile, gpu=request.gpu, engine=request.engine, model=request.model
                )
                result = run_estimate(request, catalog=catalog).result
                predicted = predicted_metrics(result)
                work = result.sequence_steps
            except PlanningError:
                predicted, work = None, 1
            self.point_seconds[i] += time.perf_counter() - started
            self.point_sequence_steps[i] += work
            self.meter.sequence_steps += work
            out.append(predicted)
        self.evaluations += 1
        self.simulated[key] = out
        return out

    def errors_pct(self, x: FloatArray) -> dict[str, list[float]]:
        """Absolute % errors per metric at x."""
        _, predictions = self.evaluate(x)
        errors: dict[str, list[float]] = {}
        for point, predicted in zip(self.points, predictions, strict=True):
            for metric, observed in point.observed_ms.items():
                errors.setdefault(metric, []).append(abs(predicted.get(metric, 3 * observed) / observed - 1) * 100)
        return errors


def to_x(name: str, value: float) -> float:
    """The fit variable of a parameter value."""
    p = PARAMETERS[name]
    return math.log(value) if p.kind == "factor" else value / p.unit_s


def from_x(name: str, x: float) -> float:
    """The parameter value of a fit variable."""
    p = PARAMETERS[name]
    return math.exp(x) if p.kind == "factor" else max(0.0, x * p.unit_s)


def profile_with(base: Profile, values: Mapping[str, float]) -> Profile:
    """``base`` with the named factors and engine constants replaced."""
    factors: dict[str, Any] = {f"{n}_factor": v for n, v in values.items() if n in FACTOR_NAMES}
    constants = {**base.engine_constants, **{n: v for n, v in values.items() if n in ENGINE_CONSTANTS}}
    return replace(base, engine_constants=constants, **factors)


def _bounds(name: str, upper_factor: Mapping[str, float]) -> tuple[float, float]:
    p = PARAMETERS[name]
    if p.kind == "factor":
        return MIN_FACTOR, upper_factor[name]
    return 0.0, p.upper_s


def _prior(name: str, catalog: Catalog, engine: str) -> float:
    if PARAMETERS[name].kind == "factor":
        return 1.0
    return float(getattr(catalog.engine(engine), name))


def prior_sigma_x(name: str, prior: float) -> float:
    """One standard deviation of the prior belief in a parameter, in its fit variable."""
    p = PARAMETERS[name]
    if p.kind == "factor":
        return PRIOR_FACTOR_LOG_SIGMA
    # An engine constant is known to its own size (another version may differ by as much), at least a meaningful step.
    return max(prior / p.unit_s, p.meaningful)


def fit_profile(
    points: Sequence[MeasuredPoint],
    *,
    catalog: Catalog,
    gpu: str,
    engine: str,
    fit: Sequence[str] | None = None,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
    max_points: int = DEFAULT_MAX_POINTS,
    kernel_calibration: Mapping[str, Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    pinned: Mapping[str, float] | None = None,
    work_budget_sequence_steps: int | None = None,
    point_costs: Sequence[float] | None = None,
) -> CalibrationResult:
    """Fit a profile on measured points; CalibrationError when the data cannot support the fit.

    ``fit`` names the parameters to fit (each must be identifiable, else the fit is refused); without it the
    identifiable ones among PARAMETERS are chosen and the others kept at their catalog values, and a factor the
    fit drives to its physical limit is held there (``pinned``) while the others are fitted again; with ``fit``
    that is a refusal. With ``work_budget_sequence_steps`` the fit is bounded by simulated work instead of
    ``time_budget_s``: the same points and steps on any machine, so its result is reproducible. ``point_costs``
    is what one simulation of each point cost (in the fit's spread order) when a caller measured it already: the
    refit with a factor held does not simulate every point again to learn it.
    """
    from scipy.optimize import least_squares  # type: ignore[import-untyped]

    started = clock()
    meter = _WorkMeter()
    budget_clock: Callable[[], float]
    if work_budget_sequence_steps is not None:
        if work_budget_sequence_steps < 1:
            raise CalibrationError("the work budget must be at least one sequence-step")
        budget, budget_clock = float(work_budget_sequence_steps), meter
        budget_text = f"budget of {work_budget_sequence_steps} simulated sequence-steps"
    else:
        budget, budget_clock = time_budget_s, clock
        budget_text = f"{time_budget_s:g} s budget"
    if not points:
        raise CalibrationError("no measured points to calibrate on")
    unknown = [n for n in fit or () if n not in PARAMETERS]
    if unknown:
        raise CalibrationError(f"unknown fit parameter {unknown[0]!r}; known: {', '.join(PARAMETERS)}")
    gpu_spec = catalog.gpu(gpu)
    engine_spec = catalog.engine(engine)
    models = tuple(sorted({p.request.model for p in points}))
    base = Profile(
        gpu=gpu_spec.name, engine=engine_spec.name, models=models, kernel_calibration=dict(kernel_calibration or {})
    )
    kernel_base = catalog.calibration_for(gpu_spec)
    if kernel_calibration:
        kernel_base = kernel_base.with_overrides(dict(kernel_calibration))
    upper_factor = factor_upper_bounds(kernel_base)
    pinned = dict(pinned or {})
    base = profile_with(base, pinned)
    candidates = [n for n in (fit or PRIORITY) if n not in pinned]
    multi_gpu = any(max(p.request.tp, p.request.decode_tp, p.request.prefill_tp) > 1 for p in points)
    notes: list[str] = []
    held: dict[str, str] = {}
    if not fit and not multi_gpu:
        candidates.remove("collective_bandwidth")
        held["collective_bandwidth"] = "no multi-GPU runs among the measurements"
    ordered = spread_order(points)
    selected = ordered[:max_points]
    if len(selected) < len(points):
        notes.append(f"fitted on {len(selected)} of {len(points)} points (deterministic spread over groups)")
    priors = {n: _prior(n, catalog, engine_spec.name) for n in PARAMETERS}
    evaluator = _Evaluator(selected, catalog=catalog, base=base, names=candidates, fit_mode=True, meter=meter)
    x0 = np.array([to_x(n, max(priors[n], 0.0)) for n in candidates])
    all_evaluator: _Evaluator | None = None
    if point_costs is None:
        # What one simulation of each point costs, measured on them all at the prior (kept: a fit that converges
        # with budget left goes on with more of them).
        evaluator(x0)
        measured = evaluator.point_seconds if work_budget_sequence_steps is None else evaluator.point_sequence_steps
        point_costs, all_evaluator = list(measured), evaluator
    one_simulation_costs = list(point_costs[: len(selected)])
    # Keep as many points as the budget allows for about (2p + 8) simulations of the fit (p: the parameters that
    # need one; the API latency is added, not simulated).
    simulated_candidates = sum(1 for n in candidates if n not in ADDITIVE_PARAMETERS)
    per_eval_budget = budget * 0.8 / (2 * simulated_candidates + 8)
    cumulative = np.cumsum(one_simulation_costs)
    keep = max(1, int(np.searchsorted(cumulative, per_eval_budget, side="right")))
    all_selected = selected
    if keep < len(selected):
        notes.append(f"fitted on {keep} of {len(points)} points to stay within the {budget_text}")
        selected = selected[:keep]
        evaluator = _Evaluator(selected, catalog=catalog, base=base, names=candidates, fit_mode=True, meter=meter)
    r0 = evaluator(x0)
    m = r0.size
    # Identifiability at the prior: each parameter's effect, scaled to a meaningful change.
    jacobian0 = _jacobian(evaluator, x0, candidates, upper_factor, clock=budget_clock, deadline=math.inf)
    chosen: list[str] = []
    basis: list[FloatArray] = []
    for j, name in enumerate(candidates):
        column = jacobian0[:, j] * PARAMETERS[name].meaningful
        rms = float(np.sqrt(np.mean(column**2))) if m else 0.0
        if rms < MIN_SENSITIVITY:
            held[name] = f"not identifiable: a meaningful change moves the predictions by {rms * 100:.2f}% RMS"
            continue
        rest = column.copy()
        for b in basis:
            rest -= float(rest @ b) * b
        independence = float(np.linalg.norm(rest) / np.linalg.norm(column))
        if independence < MIN_INDEPENDENCE:
            held[name] = f"not identifiable apart from {', '.join(chosen)} with these measurements"
            continue
        if len(chosen) + 1 >= m:
            held[name] = f"too few measured values ({m}) to fit more parameters"
            continue
        chosen.append(name)
        basis.append(rest / np.linalg.norm(rest))
    if fit and held:
        name, reason = next(iter(held.items()))
        raise CalibrationError(f"cannot fit {name}: {reason}; measure more varied loads or drop it from --fit")
    if not chosen:
        reasons = "; ".join(f"{n}: {r}" for n, r in held.items())
        raise CalibrationError(f"nothing can be fitted from these measurements ({reasons})")
    if m <= len(chosen):
        raise CalibrationError(f"too few measured values: {m} for {len(chosen)} parameters")
    idx = [candidates.index(n) for n in chosen]
    fixed_x = x0.copy()
    lower = np.array([to_x(n, max(_bounds(n, upper_factor)[0], 1e-12)) for n in chosen])
    upper = np.array([to_x(n, _bounds(n, upper_factor)[1]) for n in chosen])
    start = np.clip(x0[idx], lower, upper)
    deadline = (0.0 if work_budget_sequence_steps is not None else started) + budget
    # The prior as residual rows in the units of a measured metric's noise: each moves as one more measurement would.
    prior_weights = np.array([RESIDUAL_SCALE / prior_sigma_x(n, priors[n]) for n in chosen])
    prior_x = x0[idx]

    def with_prior(r: FloatArray, z: FloatArray) -> FloatArray:
        return np.concatenate([r, prior_weights * (z - prior_x)])

    best: dict[str, Any] = {"cost": fit_cost(with_prior(r0, prior_x), len(chosen)), "x": x0.copy()}

    def fun(z: FloatArray) -> FloatArray:
        x = full_x(fixed_x, idx, z)
        if not evaluator.is_free(x) and budget_clock() > deadline:
            raise _BudgetSpentError
        r = with_prior(evaluator(x), z)
        cost = fit_cost(r, len(chosen))
        if cost < best["cost"]:
            best.update(cost=cost, x=x.copy())
        return r

    # The last Jacobian computed on the current points (at x0 the identifiability check's).
    last_jacobian: dict[str, Any] = {"x": x0.copy(), "J": jacobian0[:, idx]}

    def data_jac(z: FloatArray) -> FloatArray:
        x = full_x(fixed_x, idx, z)
        if np.allclose(x, last_jacobian["x"]):
            return np.asarray(last_jacobian["J"])
        computed = _jacobian(evaluator, x, candidates, upper_factor, clock=budget_clock, deadline=deadline, only=idx)
        last_jacobian.update(x=x.copy(), J=computed)
        return computed

    def jac(z: FloatArray) -> FloatArray:
        return np.vstack([data_jac(z), np.diag(prior_weights)])

    stopped = False
    simulated_chosen = sum(1 for n in chosen if n not in ADDITIVE_PARAMETERS)
    # Every evaluator that simulated (the probe of all points at the prior among them), for the report's count.
    evaluators = [e for e in (all_evaluator, evaluator) if e is not None]
    while True:
        try:
            least_squares(
                fun,
                start,
                jac=jac,
                bounds=(lower, upper),
                loss=robust_loss(len(chosen)),
                f_scale=RESIDUAL_SCALE,
                x_scale=1.0,
                xtol=1e-3,
                ftol=1e-4,
                max_nfev=40,
            )
        except _BudgetSpentError:
            stopped = True
            notes.append(f"stopped at the {budget_text} with the best point found")
            break
        # Converged with budget left: go on from here with as many more points as about two more iterations allow,
        # unless a factor sits at its limit (the budget then goes to fitting the rest with it held there).
        x_here = np.asarray(best["x"], dtype=np.float64)
        at_limit = not fit and any(
            PARAMETERS[n].kind == "factor" and x_here[candidates.index(n)] >= hi - abs(math.log1p(-LIMIT_TOLERANCE))
            for n, hi in zip(chosen, upper, strict=True)
        )
        more = affordable_points(one_simulation_costs, deadline - budget_clock(), simulated_chosen)
        if at_limit or more <= len(selected):
            break
        notes.append(f"then refitted from that solution on {more} of {len(points)} points with the budget left")
        selected = all_selected[:more]
        evaluator = (
            all_evaluator
            if more == len(all_selected) and all_evaluator is not None
            else _Evaluator(selected, catalog=catalog, base=base, names=candidates, fit_mode=True, meter=meter)
        )
        start = np.clip(x_here[idx], lower, upper)
        r_here = evaluator(x_here)
        m = r_here.size
        best.update(cost=fit_cost(with_prior(r_here, x_here[idx]), len(chosen)), x=x_here.copy())
        evaluators.append(evaluator)
        # Until a Jacobian on the new points: the last one, the new points' rows (after the old ones) unknown.
        previous = np.asarray(last_jacobian["J"])
        last_jacobian.update(
            x=np.full_like(x0, np.nan), J=np.vstack([previous, np.zeros((m - previous.shape[0], len(idx)))])
        )
    x_best = np.asarray(best["x"], dtype=np.float64)
    r_best = evaluator(x_best)
    # Uncertainty from the Jacobian at the solution when time allows, else the last one on these points (none: the
    # prior's alone).
    jacobian = np.asarray(last_jacobian["J"])
    if jacobian.shape[0] != r_best.size:
        jacobian = np.zeros((r_best.size, len(idx)))
    if not stopped and budget_clock() < deadline and not np.allclose(x_best, last_jacobian["x"]):
        with contextlib.suppress(_BudgetSpentError):
            jacobian = _jacobian(
                evaluator, x_best, candidates, upper_factor, clock=budget_clock, deadline=deadline, only=idx
            )
    dof = max(1, m - len(chosen))
    s2 = float(r_best @ r_best) / dof
    # Posterior spread: the data's curvature and the prior's (scaled to the residuals' variance).
    prior_information = np.diag(prior_weights**2) * s2 / RESIDUAL_SCALE**2
    covariance = np.linalg.pinv(jacobian.T @ jacobian + prior_information) * s2
    values: list[FittedValue] = []
    fitted_values: dict[str, float] = {}
    held_at_limit: dict[str, float] = {}
    for k, name in enumerate(chosen):
        value = from_x(name, float(x_best[candidates.index(name)]))
        lo, hi = _bounds(name, upper_factor)
        sigma_x = math.sqrt(max(0.0, float(covariance[k, k])))
        sigma = value * sigma_x if PARAMETERS[name].kind == "factor" else sigma_x * PARAMETERS[name].unit_s
        near_upper = value >= hi * (1 - LIMIT_TOLERANCE)
        if near_upper and not fit and PARAMETERS[name].kind == "factor":
            if budget_clock() < deadline:
                # The measurements are faster than this resource allows: hold it at the datasheet peak and let
                # the other parameters account for the rest.
                left = deadline - budget_clock()
                refit = fit_profile(
                    points,
                    catalog=catalog,
                    gpu=gpu,
                    engine=engine,
                    time_budget_s=max(1.0, left),
                    max_points=max_points,
                    kernel_calibration=kernel_calibration,
                    clock=clock,
                    pinned={**pinned, name: hi},
                    work_budget_sequence_steps=None if work_budget_sequence_steps is None else max(1, int(left)),
                    point_costs=one_simulation_costs,
                )
                # The report counts the whole calibration: this fit's simulations and time with the refit's.
                whole = replace(
                    refit,
                    evaluations=refit.evaluations + simulations_run(evaluators),
                    sequence_steps=refit.sequence_steps + meter.sequence_steps,
                    elapsed_s=clock() - started,
                )
                return replace(whole, profile=replace(whole.profile, fit=fit_report(whole)))
            if not held_at_limit:
                # No budget left to fit the others again with it held: they stay as fitted beside it. Only the
                # first is held; a refit might bring the others back inside their limits, so they are reported as
                # the fit left them.
                held_at_limit[name] = hi
                pinned[name] = hi
                notes.append(f"{name} held at its physical limit with the others as fitted beside it (budget spent)")
                continue
        elif near_upper:
            what = "datasheet peak" if PARAMETERS[name].kind == "factor" else "plausible range"
            raise CalibrationError(
                f"the measurements need {name} at or beyond {hi:.4g} (its physical limit: the {what}); "
                "check the GPU, the dtype, the model and the layout the measurements were taken with"
            )
        if PARAMETERS[name].kind == "factor" and value <= lo * (1 + LIMIT_TOLERANCE):
            raise CalibrationError(
                f"the measurements need {name} at or below {lo:g} of the calibrated efficiency: "
                "far slower than this GPU can be; check the GPU, the dtype, the model and the layout"
            )
        values.append(FittedValue(name, priors[name], value, lo, hi, sigma, True))
        fitted_values[name] = value
    for name, limit in pinned.items():
        lo, hi = _bounds(name, upper_factor)
        note = "held at its physical limit: the measurements are faster than it allows"
        values.append(FittedValue(name, priors[name], limit, lo, hi, math.nan, False, note))
        fitted_values[name] = limit
    for name, reason in held.items():
        lo, hi = _bounds(name, upper_factor)
        values.append(FittedValue(name, priors[name], priors[name], lo, hi, math.nan, False, reason))
    before = _summary(evaluator.errors_pct(x0))
    # The residual of the profile as written: a factor held at its limit sits exactly on it.
    for name, limit in held_at_limit.items():
        x_best[candidates.index(name)] = to_x(name, limit)
    after = _summary(evaluator.errors_pct(x_best))
    profile = profile_with(base, fitted_values)
    elapsed_s = clock() - started
    result = CalibrationResult(
        profile=profile,
        values=tuple(values),
        before=before,
        after=after,
        points_total=len(points),
        points_used=len(selected),
        evaluations=simulations_run(evaluators),
        elapsed_s=elapsed_s,
        notes=tuple(notes),
        sequence_steps=meter.sequence_steps,
    )
    return replace(result, profile=replace(profile, fit=fit_report(result)))


def simulations_run(evaluators: Sequence[_Evaluator]) -> int:
    """Simulations the distinct evaluators among ``evaluators`` ran."""
    return sum(e.evaluations for e in {id(e): e for e in evaluators}.values())


def affordable_points(costs: Sequence[float], remaining: float, simulated_parameters: int) -> int:
    """Leading points (of one simulation each ``costs``) that ``remaining`` budget can fit about two iterations on."""
    # Two Jacobians and steps, the first residual, and the prior's once more for the report (a new evaluator).
    simulations = 2 * (simulated_parameters + 1) + 2
    return int(np.searchsorted(np.cumsum(costs), 0.9 * remaining / simulations, side="right"))


def full_x(fixed_x: FloatArray, idx: Sequence[int], z: FloatArray) -> FloatArray:
    """Every parameter's fit variable: ``fixed_x`` with the fitted ones (at ``idx``) set from ``z``."""
    x = fixed_x.copy()
    x[list(idx)] = z
    return x


def robust_loss(prior_rows: int) -> Callable[[FloatArray], FloatArray]:
    """least_squares' loss: soft-L1 on the measured residuals (outliers), plain squares on the last ``prior_rows``
    (a Gaussian prior, whose pull grows with the distance however far the data drag)."""

    def rho(z: FloatArray) -> FloatArray:
        out = np.empty((3, z.size))
        data = 1.0 + z[: z.size - prior_rows]
        measured = slice(0, z.size - prior_rows)
        out[0, measured] = 2.0 * (np.sqrt(data) - 1.0)
        out[1, measured] = data**-0.5
        out[2, measured] = -0.5 * data**-1.5
        prior = slice(z.size - prior_rows, z.size)
        out[0, prior] = z[prior]
        out[1, prior] = 1.0
        out[2, prior] = 0.0
        return out

    return rho


def fit_cost(r: FloatArray, prior_rows: int) -> float:
    """The cost least_squares minimises with ``robust_loss(prior_rows)`` and f_scale RESIDUAL_SCALE."""
    return float(0.5 * RESIDUAL_SCALE**2 * np.sum(robust_loss(prior_rows)((r / RESIDUAL_SCALE) ** 2)[0]))


def _jacobian(
    evaluator: _Evaluator,
    x: FloatArray,
    names: Sequence[str],
    upper_factor: Mapping[str, float],
    *,
    clock: Callable[[], float],
    deadline: float,
    only: Sequence[int] | None = None,
) -> FloatArray:
    """Forward differences of the residuals in x (backward at an upper bound)."""
    base = evaluator(x)
    columns = list(only) if only is not None else list(range(len(names)))
    out = np.zeros((base.size, len(columns)))
    for k, j in enumerate(columns):
        name = names[j]
        step = PARAMETERS[name].step
        if x[j] + step > to_x(name, _bounds(name, upper_factor)[1]):
            step = -step
        moved = x.copy()
        moved[j] += step
        if not evaluator.is_free(moved) and clock() > deadline:
            raise _BudgetSpentError
        out[:, k] = (evaluator(moved) - base) / step
    return out


def fit_report(result: CalibrationResult) -> dict[str, Any]:
    """What the profile keeps of its fit: residuals before/after, values with bounds and uncertainty."""
    return {
        "points": result.points_total,
        "points_used": result.points_used,
        "residual_before": result.before.as_dict(),
        "residual_after": result.after.as_dict(),
        "parameters": {v.name: v.as_dict() for v in result.values},
        "evaluations": result.evaluations,
        "sequence_steps": result.sequence_steps,
        "elapsed_s": round(result.elapsed_s, 2),
        "notes": list(result.notes),
    }


def report_lines(result: CalibrationResult) -> list[str]:
    """The fit as plain text: parameters with bounds and uncertainty, residuals before and after."""
    lines = [
        f"calibrated {result.profile.gpu} / {result.profile.engine} on {', '.join(result.profile.models)}: "
        f"{result.points_used} of {result.points_total} measured points, {result.evaluations} simulations of them "
        f"({result.sequence_steps} sequence-steps) in {result.elapsed_s:.1f} s",
        f"{'parameter':26s} {'prior':>11s} {'fitted':>11s} {'± 1 sigma':>11s} {'bounds':>22s}  note",
    ]
    for v in result.values:
        sigma = f"{v.sigma:.3g}" if v.fitted and math.isfinite(v.sigma) else "-"
        fitted = f"{v.value:.4g}" if v.fitted or v.value != v.prior else "(kept)"
        bounds = f"[{v.lower:.3g}, {v.upper:.3g}]"
        lines.append(f"{v.name:26s} {v.prior:11.4g} {fitted:>11s} {sigma:>11s} {bounds:>22s}  {v.note}")
    lines.append(f"{'residual |error|':26s} {'median':>11s} {'p90':>11s}")
    lines.append(f"{'  before':26s} {result.before.median_pct:10.1f}% {result.before.p90_pct:10.1f}%")
    lines.append(f"{'  after':26s} {result.after.median_pct:10.1f}% {result.after.p90_pct:10.1f}%")
    for metric in result.before.per_metric:
        b = result.before.per_metric[metric]
        a = result.after.per_metric.get(metric, (math.nan, math.nan))
        lines.append(f"  {metric:24s} {b[0]:10.1f}% {b[1]:10.1f}%  ->  {a[0]:.1f}% / {a[1]:.1f}%")
    lines.extend(f"note: {n}" for n in result.notes)
    return lines


def fit_kernel_tables(
    tables: Mapping[str, Any], *, catalog: Catalog, gpu: str
) -> tuple[dict[str, Any], list[tuple[str, int, float, float]]]:
    """Kernel calibration fields fitted on kernel tables shaped like the reference ones (bench/calibrate.py's fit).

    Returns the fields (JSON-ready) and per op kind (kind, rows, median % error before, after).
    """
    from service.planning.calibration_fit import fit_all
    from service.planning.kernel_accuracy import kernel_errors

    gpu_spec = catalog.gpu(gpu)
    base = catalog.calibration_for(gpu_spec)
    usable = {name: rows for name, rows in tables.items() if getattr(rows, "size", 0) >= 8}
    if not usable:
        raise CalibrationError("the kernel tables hold too few rows to fit (at least 8 per table)")
    values = fit_all(usable, gpu_spec, base, holdout=False)
    if not values:
        raise CalibrationError("no kernel constant could be fitted from these tables")
    fitted = base.with_overrides(values)
    before = {s.kind: s for s in kernel_errors(usable, gpu=gpu_spec, calibration=base)}
    after = {s.kind: s for s in kernel_errors(usable, gpu=gpu_spec, calibration=fitted)}
    summary = [(k, before[k].rows, before[k].median_pct, after[k].median_pct) for k in before if k in after]
    plain = {
        key: {str(k): float(v) for k, v in value.items()} if isinstance(value, Mapping) else value
        for key, value in values.items()
    }
    return plain, summary
