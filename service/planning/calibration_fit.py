"""Fit KernelCalibration constants to measured kernel tables by least squares on log error (no file I/O)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy.optimize import least_squares  # type: ignore[import-untyped]

from service.planning.kernel_accuracy import PREDICTORS, measured_s, usable_rows
from service.planning.kernels import FloatArray, GemmTileRule, KernelCalibration, dispatch_kernels, dispatch_key
from service.planning.mla_cost import MlaCalibration
from service.planning.moe_cost import MoeCalibration
from service.planning.moe_fit import (
    ALLTOALL_MODES,
    fit_alltoall,
    fit_mla,
    fit_moe,
    mla_values,
    prepare_alltoall_rows,
    prepare_moe_rows,
    table_kernel,
)
from service.planning.specs import DType, GpuSpec

# Share of shapes held out of every fit (chosen by a hash of the shape, so the split is reproducible).
HOLDOUT_FRACTION = 0.2
# Columns that name a shape per table; every row of a held-out shape is held out.
SHAPE_KEYS: dict[str, tuple[str, ...]] = {
    "gemm": ("n", "k"),
    "attention_context": ("num_heads", "num_key_value_heads", "head_dim"),
    "attention_generation": ("num_heads", "num_key_value_heads", "head_dim"),
    "nccl": ("message_elems",),
    "custom_allreduce": ("message_elems",),
    "moe": ("hidden_size", "inter_size", "topk", "num_experts"),
    "moe_alltoall": ("hidden_size", "topk", "num_experts"),
    "mla_context": ("num_heads",),
    "mla_generation": ("num_heads",),
    "mla_bmm": ("num_heads",),
}
# Weight of the pull of every fitted parameter toward the middle of its log-range, per square root of the rows
# fitted. It enters the robust loss like a row's log error, so it only decides where the rows do not.
PRIOR_WEIGHT = 1e-2
# Finite-difference step of the fits in log-parameter space: each parameter moves by 1%, whatever its units.
LOG_STEP = 1e-2
# Scale of the soft-L1 loss on log errors: rows off by more than about 5% count linearly, not quadratically.
LOSS_SCALE = 0.05
# Rows a fit samples at most per group (deterministic stride), to keep calibration fast.
MAX_FIT_ROWS = 20000


@dataclass(frozen=True, slots=True)
class Param:
    """One fitted constant: a calibration field (or one key of a dict field) with its bounds."""

    field: str
    low: float
    high: float
    key: str | DType | None = None


@dataclass(frozen=True, slots=True)
class Fitter:
    """A named fitting step: which table it reads and the function that returns field overrides."""

    name: str
    table: str
    fit: Callable[[np.ndarray, GpuSpec, KernelCalibration], dict[str, Any]]


def holdout_mask(
    table: str, rows: np.ndarray, fraction: float = HOLDOUT_FRACTION, *, architecture: str = ""
) -> np.ndarray:
    """True for rows whose shape is held out of fitting (CRC32 of the shape, so it is the same on any machine).

    A MoE expert kernel whose every shape falls in the held-out share keeps them all for fitting: held out, it would
    run on the bf16 kernel's constants (the int4 Marlin kernel, timed on one model's shape, was). So for the MoE
    table a row's fate also depends on its kernel's other rows, and such a kernel has no held-out figure."""
    keys = SHAPE_KEYS.get(table, ())
    if not keys or rows.size == 0:
        return np.zeros(rows.size, dtype=bool)
    labels = ["|".join(str(rows[k][i]) for k in keys) for i in range(rows.size)]
    buckets = np.array([zlib.crc32(label.encode()) % 1000 for label in labels])
    held: np.ndarray = buckets < fraction * 1000
    if table == "moe":
        names = rows.dtype.names or ()
        sources = rows["kernel_source"] if "kernel_source" in names else np.full(rows.size, "")
        kernels = np.array(
            [table_kernel(str(d), str(s), architecture) for d, s in zip(rows["dtype"], sources, strict=True)]
        )
        for kernel in np.unique(kernels):
            of_kernel = kernels == kernel
            if held[of_kernel].all():
                held = held & ~of_kernel
    return held


def _get(cal: KernelCalibration, p: Param) -> float:
    value = getattr(cal, p.field)
    if p.key is None:
        return float(value)
    return float(value.get(p.key, (p.low * p.high) ** 0.5))


def apply_values(cal: KernelCalibration, params: list[Param], values: FloatArray) -> KernelCalibration:
    """A calibration with the parameters set to ``values``."""
    overrides: dict[str, Any] = {}
    for p, v in zip(params, values, strict=True):
        if p.key is None:
            overrides[p.field] = float(v)
        else:
            current = dict(overrides.get(p.field, getattr(cal, p.field)))
            current[p.key] = float(v)
            overrides[p.field] = current
    return replace(cal, **overrides)


def fit_params(
    params: list[Param],
    predict: Callable[[KernelCalibration], FloatArray],
    measured: FloatArray,
    base: KernelCalibration,
    *,
    range_starts: tuple[float, ...] = (),
) -> KernelCalibration:
    """Least squares on log(predicted/measured) over log-scaled parameters from ``base`` and from each fraction in
    ``range_starts`` of every log-range; the lowest cost wins."""
    low = np.log([p.low for p in params])
    high = np.log([p.high for p in params])
    middle = 0.5 * (low + high)
    prior_scale = PRIOR_WEIGHT * np.sqrt(measured.size) / (high - low)

    last: dict[bytes, FloatArray] = {}

    def residual(x: FloatArray) -> FloatArray:
        # least_squares asks for the Jacobian at the point it has just evaluated: keep that one evaluation.
        key = x.tobytes()
        if key in last:
            # A copy: least_squares rescales the residuals it is given in place for the robust loss.
            return last[key].copy()
        pred = predict(apply_values(base, params, np.exp(x)))
        data: FloatArray = np.log(np.maximum(pred, 1e-12) / measured)
        # A weak pull toward the middle of each parameter's log-range makes the optimum unique where the table
        # does not determine a parameter, so the fit lands on the same values from any start.
        out: FloatArray = np.concatenate([data, prior_scale * (x - middle)])
        last.clear()
        last[key] = out.copy()
        return out

    def jacobian(x: FloatArray) -> FloatArray:
        # Forward differences of LOG_STEP in every log-parameter (backward at an upper bound): a step that sees
        # through the kinks of the models' max() and ceil() terms, the same for every parameter whatever its units.
        at_x = residual(x)
        out = np.empty((at_x.size, x.size))
        for j in range(x.size):
            step = LOG_STEP if x[j] + LOG_STEP <= high[j] else -LOG_STEP
            moved = x.copy()
            moved[j] += step
            out[:, j] = (residual(moved) - at_x) / step
        return out

    starts = [np.log([max(_get(base, p), 1e-30) for p in params])]
    starts += [low + fraction * (high - low) for fraction in range_starts]
    best_x, best_cost = starts[0], np.inf
    for x0 in starts:
        # soft_l1 keeps a few noisy rows (throttled or eager-launched timings) from pulling the median.
        result = least_squares(
            residual,
            np.clip(x0, low + 1e-9, high - 1e-9),
            jac=jacobian,
            bounds=(low, high),
            loss="soft_l1",
            f_scale=LOSS_SCALE,
            max_nfev=400,
        )
        if result.cost < best_cost:
            best_x, best_cost = result.x, result.cost
    return apply_values(base, params, np.exp(best_x))


def soft_l1_loss(log_error: FloatArray) -> float:
    """Mean soft-L1 loss of log errors at LOSS_SCALE, the loss the fits minimise (before the prior)."""
    return float(np.mean(2.0 * (np.sqrt(1.0 + (log_error / LOSS_SCALE) ** 2) - 1.0)))


def _subsample(rows: np.ndarray) -> np.ndarray:
    if rows.size <= MAX_FIT_ROWS:
        return rows
    stride = int(np.ceil(rows.size / MAX_FIT_ROWS))
    return rows[::stride]


def _values(cal: KernelCalibration, params: list[Param]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in params:
        value = getattr(cal, p.field)
        if p.key is None:
            out[p.field] = float(value)
        else:
            out[p.field] = {str(k): float(v) for k, v in value.items()}
    return out


def _fit_table(
    table: str,
    rows: np.ndarray,
    gpu: GpuSpec,
    base: KernelCalibration,
    params: list[Param],
    range_starts: tuple[float, ...] = (),
) -> tuple[KernelCalibration, dict[str, Any]]:
    rows = _subsample(rows)
    if rows.size == 0:
        return base, {}
    predictor = PREDICTORS[table]
    cal = fit_params(
        params, lambda c: predictor(rows, gpu=gpu, calibration=c), measured_s(rows), base, range_starts=range_starts
    )
    return cal, _values(cal, params)


def fit_gemm(rows: np.ndarray, gpu: GpuSpec, base: KernelCalibration) -> dict[str, Any]:
    """bf16 fixes the shared tile/memory constants; each scaled kernel then gets its own efficiency and costs."""
    out: dict[str, Any] = {}
    cal = base
    bf16 = rows[rows["dtype"] == "bf16"]
    shared = [
        Param("gemm_peak_efficiency", 0.2, 1.0, DType.BF16),
        Param("gemm_k_overhead_elems", 1.0, 4096.0, DType.BF16),
        Param("gemm_occupancy_power", 0.01, 1.0),
        Param("gemm_bandwidth_efficiency", 0.3, 1.0),
        Param("gemm_blend_power", 1.0, 20.0),
        Param("gemm_launch_s", 5e-7, 2e-5),
    ]
    cal, values = _fit_table("gemm", bf16, gpu, cal, shared)
    out.update(values)
    tiled_shared_fitted = False
    for name, dtype in (("fp8", DType.FP8), ("nvfp4", DType.FP4)):
        sel = rows[rows["dtype"] == name]
        if sel.size == 0:
            continue
        key = dispatch_key(gpu.architecture, dtype)
        rules = cal.gemm_dispatch.get(key, ())
        quantisation = [
            Param("gemm_quant_launch_s", 1e-7, 5e-5, dtype),
            Param("gemm_quant_per_row_s", 1e-11, 1e-7, dtype),
            Param("gemm_quant_bytes_per_element", 2.0 + dtype.bytes_per_element, 32.0, dtype),
        ]
        roofline = [
            Param("gemm_peak_efficiency", 0.1, 1.0, dtype),
            Param("gemm_k_overhead_elems", 1.0, 4096.0, dtype),
        ]
        if rules:
            tiled = [Param("gemm_tiled_efficiency", 0.05, 1.0, kernel) for kernel in _kernels_used(rules, sel)]
            if not tiled_shared_fitted:
                # The first tiled dtype (fp8 where the table has it) fits the GPU's L2 feed, wave and blend
                # constants; the other dtype's kernels on the same GPU share them.
                tiled_shared_fitted = True
                tiled += [
                    Param("gemm_tiled_feed_bandwidth_factor", 0.5, 30.0),
                    Param("gemm_tiled_wave_power", 0.01, 1.0),
                    Param("gemm_tiled_blend_power", 1.0, 20.0),
                    Param("gemm_tiled_bandwidth_efficiency", 0.2, 1.0),
                ]
            cal, values = _fit_table("gemm", sel, gpu, cal, tiled + quantisation)
            out.update(values)
            # The plain roofline stays the fallback for architectures without a dispatch table: fitted on the
            # same rows with the same activation-quantisation costs.
            untiled_dispatch = {k: v for k, v in cal.gemm_dispatch.items() if k != key}
            untiled, values = _fit_table("gemm", sel, gpu, replace(cal, gemm_dispatch=untiled_dispatch), roofline)
            cal = replace(untiled, gemm_dispatch=cal.gemm_dispatch)
        else:
            cal, values = _fit_table("gemm", sel, gpu, cal, roofline + quantisation)
        out.update(values)
    if DType.FP8 in cal.gemm_peak_efficiency:
        # No int8 table: int8 scaled GEMMs run the same CUTLASS path as fp8 at the same peak.
        for field_name in (
            "gemm_peak_efficiency",
            "gemm_k_overhead_elems",
            "gemm_quant_launch_s",
            "gemm_quant_per_row_s",
            "gemm_quant_bytes_per_element",
        ):
            mapping = dict(getattr(cal, field_name))
            mapping[DType.INT8] = mapping[DType.FP8]
            out[field_name] = {str(k): float(v) for k, v in mapping.items()}
    block = rows[rows["dtype"] == "fp8_block"]
    if block.size:
        params = [
            Param("gemm_block_scaled_efficiency", 0.1, 1.0),
            Param("gemm_block_scaled_launch_s", 1e-7, 1e-3),
            Param("gemm_block_scaled_k_overhead_elems", 1.0, 4096.0),
        ]
        cal, values = _fit_table("gemm", block, gpu, cal, params)
        out.update(values)
    return out


def _kernels_used(rules: tuple[GemmTileRule, ...], rows: np.ndarray) -> list[str]:
    """The dispatch's kernels that some row of the table runs, in rule order."""
    shape = [rows[col].astype(np.float64) for col in ("m", "n", "k")]
    kernels, chosen = dispatch_kernels(rules, *shape)
    used = set(np.unique(chosen).tolist())
    return list(dict.fromkeys(kernels[i] for i in range(len(kernels)) if i in used))


def fit_attention_context(rows: np.ndarray, gpu: GpuSpec, base: KernelCalibration) -> dict[str, Any]:
    """Prefill attention: MMA efficiency, softmax cost, per-tile fixed work, makespan blend, fp8 KV, memory, launch."""
    params = [
        Param("attention_prefill_efficiency", 0.1, 1.0),
        Param("attention_prefill_softmax_s_per_score", 1e-14, 1e-10),
        Param("attention_prefill_cta_fixed_tiles", 1e-3, 20.0),
        Param("attention_prefill_makespan_power", 1.0, 16.0),
        Param("attention_prefill_fp8_kv_factor", 0.5, 2.0),
        Param("attention_prefill_bandwidth_efficiency", 0.05, 1.0),
        Param("attention_launch_s", 1e-6, 1e-4),
    ]
    # One-token rows time the decode kernel (the engines dispatch them there); its own fit prices them.
    rows = rows[rows["input_len"] > 1]
    if rows.size == 0:
        return {}
    # Whether the kernel packs a KV head's query heads into one tile is the kernel's choice (FA3 on Hopper does for
    # GQA; the B200 table's time follows the query heads, not the KV heads): fit both and keep the closer.
    fits = []
    for pack in (True, False):
        cal, values = _fit_table("attention_context", rows, gpu, replace(base, attention_prefill_pack_gqa=pack), params)
        fits.append(
            (_fit_cost("attention_context", rows, gpu, cal), not pack, {**values, "attention_prefill_pack_gqa": pack})
        )
    return min(fits)[2]


def _fit_cost(table: str, rows: np.ndarray, gpu: GpuSpec, cal: KernelCalibration) -> float:
    """The soft-L1 loss of a calibration's log errors on a table's fitted rows."""
    rows = _subsample(rows)
    return soft_l1_loss(np.log(np.maximum(PREDICTORS[table](rows, gpu=gpu, calibration=cal), 1e-12) / measured_s(rows)))


def fit_attention_generation(rows: np.ndarray, gpu: GpuSpec, base: KernelCalibration) -> dict[str, Any]:
    """Decode attention: achieved KV bandwidth per KV dtype, the stream's ramp, per-sequence bytes, launch floor and
    the split-KV CTA terms (fixed cost, per-key stream and MMA costs, fp8 MMA factor, CTAs per SM)."""
    params = [
        Param("attention_decode_bandwidth_efficiency", 0.1, 1.0, DType.BF16),
        Param("attention_decode_bandwidth_efficiency", 0.1, 1.0, DType.FP8),
        Param("attention_decode_per_sequence_bytes", 1e2, 1e7),
        Param("attention_decode_launch_s", 1e-6, 1e-4),
        Param("attention_decode_memory_ramp_s", 1e-8, 1e-4),
        Param("attention_decode_cta_fixed_s", 1e-8, 1e-4),
        Param("attention_decode_cta_stream_cost", 1e-2, 10.0),
        Param("attention_decode_cta_mma_cost", 0.5, 20.0),
        Param("attention_decode_fp8_mma_factor", 0.25, 8.0),
        Param("attention_decode_ctas_per_sm", 1.0, 16.0),
    ]
    # The CTA terms are off (zero) by default: start them inside their bounds (geometric middle).
    start = apply_values(base, params, np.array([_start(base, p) for p in params]))
    # Its max() of stream and MMA costs has more than one basin: start from three more points of the ranges too.
    return _fit_table("attention_generation", rows, gpu, start, params, range_starts=(0.25, 0.5, 0.75))[1]


def _start(cal: KernelCalibration, p: Param) -> float:
    """The current value of a parameter, or the geometric middle of its bounds where that lies outside them."""
    value = _get(cal, p)
    return value if p.low <= value <= p.high else float(np.sqrt(p.low * p.high))


def fit_nccl(rows: np.ndarray, gpu: GpuSpec, base: KernelCalibration) -> dict[str, Any]:
    """NCCL per collective kind: base latency, per-hop latency, bus efficiency; all_reduce's are the shared ones."""
    cal = base
    out: dict[str, dict[str, float]] = {
        "collective_kind_base_latency_s": {},
        "collective_kind_latency_per_log2_gpu_s": {},
        "collective_kind_bus_efficiency": {},
    }
    for kind in sorted(set(rows["op_name"].astype(str).tolist())):
        params = [
            Param("collective_kind_base_latency_s", 1e-7, 1e-4, kind),
            Param("collective_kind_latency_per_log2_gpu_s", 1e-8, 1e-4, kind),
            Param("collective_kind_bus_efficiency", 0.05, 1.5, kind),
        ]
        cal, _ = _fit_table("nccl", rows[rows["op_name"] == kind], gpu, cal, params)
        for field_name in out:
            out[field_name][kind] = float(getattr(cal, field_name)[kind])
    result: dict[str, Any] = dict(out)
    if "all_reduce" in out["collective_kind_bus_efficiency"]:
        result["collective_base_latency_s"] = out["collective_kind_base_latency_s"]["all_reduce"]
        result["collective_latency_per_log2_gpu_s"] = out["collective_kind_latency_per_log2_gpu_s"]["all_reduce"]
        result["collective_bus_efficiency"] = out["collective_kind_bus_efficiency"]["all_reduce"]
    return result


def fit_custom_allreduce(rows: np.ndarray, gpu: GpuSpec, base: KernelCalibration) -> dict[str, Any]:
    """vLLM custom all-reduce inside CUDA graphs, below its buffer size: latency terms and bus efficiency."""
    rows = rows[usable_rows("custom_allreduce", rows)]
    size = rows["message_elems"].astype(np.float64) * 2.0
    rows = rows[size < base.custom_all_reduce_max_bytes]
    params = [
        Param("custom_all_reduce_base_latency_s", 1e-7, 1e-4),
        Param("custom_all_reduce_latency_per_gpu_s", 1e-9, 1e-5),
        Param("custom_all_reduce_bus_efficiency", 0.05, 1.5),
    ]
    return _fit_table("custom_allreduce", rows, gpu, base, params)[1]


FITTERS: list[Fitter] = [
    Fitter("gemm", "gemm", fit_gemm),
    Fitter("attention_context", "attention_context", fit_attention_context),
    Fitter("attention_generation", "attention_generation", fit_attention_generation),
    Fitter("nccl", "nccl", fit_nccl),
    Fitter("custom_allreduce", "custom_allreduce", fit_custom_allreduce),
]


def fit_all(
    tables: Mapping[str, np.ndarray],
    gpu: GpuSpec,
    base: KernelCalibration,
    *,
    holdout: bool = True,
) -> dict[str, Any]:
    """Run every fitter whose table is present on its training rows; returns the fitted field values."""
    values: dict[str, Any] = {}
    cal = base
    for fitter in FITTERS:
        rows = tables.get(fitter.table)
        if rows is None or rows.size == 0:
            continue
        if holdout:
            rows = rows[~holdout_mask(fitter.table, rows, architecture=gpu.architecture)]
        fitted = fitter.fit(rows, gpu, cal)
        values.update(fitted)
        cal = cal.with_overrides(fitted)
    return values


@dataclass(frozen=True, slots=True)
class MoeFitter:
    """A fitting step of the MoE / all-to-all / MLA constants (written to moe_calibration.yaml)."""

    name: str
    tables: tuple[str, ...]
    fit: Callable[[Mapping[str, np.ndarray], GpuSpec, MoeCalibration], MoeCalibration]


def fit_moe_layer(tables: Mapping[str, np.ndarray], gpu: GpuSpec, base: MoeCalibration) -> MoeCalibration:
    """Fused-MoE layer: per expert kernel efficiencies, M tile, fixed/per-pair costs (moe_fit.fit_moe)."""
    return fit_moe(prepare_moe_rows(tables["moe"], gpu), gpu, base)


def fit_moe_alltoall(tables: Mapping[str, np.ndarray], gpu: GpuSpec, base: MoeCalibration) -> MoeCalibration:
    """DeepEP all-to-all: low_latency from deepep_ll, normal from deepep_ht, per phase."""
    cal = base
    for backend, mode in ALLTOALL_MODES.items():
        rows = prepare_alltoall_rows(tables["moe_alltoall"], backend)
        if rows.tokens.size:
            cal = fit_alltoall(rows, gpu, mode, cal)
    return cal


def fit_mla_block(tables: Mapping[str, np.ndarray], gpu: GpuSpec, base: MoeCalibration) -> MoeCalibration:
    """MLA attention block (prefill, absorbed decode, its batched GEMMs), stored under ``mla``."""
    mla = fit_mla(tables, gpu, MlaCalibration().with_overrides(base.mla))
    return replace(base, mla=mla_values(mla))


MOE_FITTERS: list[MoeFitter] = [
    MoeFitter("moe", ("moe",), fit_moe_layer),
    MoeFitter("moe_alltoall", ("moe_alltoall",), fit_moe_alltoall),
    MoeFitter("mla", ("mla_context", "mla_generation", "mla_bmm"), fit_mla_block),
]


def fit_all_moe(
    tables: Mapping[str, np.ndarray],
    gpu: GpuSpec,
    base: MoeCalibration,
    *,
    holdout: bool = True,
) -> tuple[MoeCalibration, list[str]]:
    """Run every MoE fitter with at least one of its tables present (training rows only); the fitted
    calibration and the names of the fitters that ran."""
    cal = base
    ran = []
    for fitter in MOE_FITTERS:
        present = {t: tables[t] for t in fitter.tables if t in tables and tables[t].size}
        if not present:
            continue
        if holdout:
            present = {t: rows[~holdout_mask(t, rows, architecture=gpu.architecture)] for t, rows in present.items()}
        cal = fitter.fit(present, gpu, cal)
        ran.append(fitter.name)
    return cal, ran
