"""Kernel-level error of the calibrated roofline against measured kernel tables (arrays in, errors out)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from service.planning.kernels import (
    FloatArray,
    KernelCalibration,
    attention_decode_times_s,
    attention_prefill_time_s,
    collective_times_s,
    custom_all_reduce_times_s,
    gemm_time_s,
    prefill_chunk_tiles,
    prefill_tile_shape,
)
from service.planning.moe_cost import MoeCalibration
from service.planning.specs import DType, GpuSpec

# Table names (the reference files are <gpu>_<table>.csv) and the kernels each holds.
TABLES = ("gemm", "attention_context", "attention_generation", "nccl", "custom_allreduce")
# Tables of the MoE layer, DeepEP all-to-all and MLA block (scored by moe_kernel_errors, MoE calibration).
MOE_TABLES = ("moe", "moe_alltoall", "mla_context", "mla_generation", "mla_bmm")
# Reference dtype names of GEMM rows: storage dtype and whether the kernel is block-scaled.
GEMM_DTYPES: dict[str, tuple[DType, bool]] = {
    "bf16": (DType.BF16, False),
    "fp8": (DType.FP8, False),
    "fp8_block": (DType.FP8, True),
    "nvfp4": (DType.FP4, False),
}
# Bytes per element of nccl-tests dtypes.
NCCL_DTYPE_BYTES = {"half": 2.0, "bf16": 2.0, "float": 4.0, "int8": 1.0}


@dataclass(frozen=True, slots=True)
class ErrorSummary:
    """Median and p90 absolute percentage error over a set of kernels."""

    kind: str
    rows: int
    median_pct: float
    p90_pct: float


def summarize(kind: str, predicted_s: FloatArray, measured_s: FloatArray) -> ErrorSummary:
    """Absolute percentage errors of predictions against measurements."""
    err = np.abs(predicted_s / measured_s - 1.0) * 100.0
    if err.size == 0:
        return ErrorSummary(kind, 0, float("nan"), float("nan"))
    return ErrorSummary(kind, int(err.size), float(np.median(err)), float(np.percentile(err, 90)))


def _f(rows: np.ndarray, name: str) -> FloatArray:
    out: FloatArray = rows[name].astype(np.float64)
    return out


def measured_s(rows: np.ndarray) -> FloatArray:
    """Measured latency of each row in seconds."""
    return _f(rows, "latency_ms") * 1e-3


def predict_gemm(rows: np.ndarray, *, gpu: GpuSpec, calibration: KernelCalibration) -> FloatArray:
    """Predicted GEMM times; rows have fields dtype, m, n, k."""
    pred = np.full(rows.size, np.nan)
    for name, (dtype, block_scaled) in GEMM_DTYPES.items():
        sel = rows["dtype"] == name
        if sel.any():
            part = rows[sel]
            pred[sel] = gemm_time_s(
                _f(part, "m"),
                _f(part, "n"),
                _f(part, "k"),
                gpu=gpu,
                weight_dtype=dtype,
                calibration=calibration,
                block_scaled=block_scaled,
            )
    return pred


def predict_attention_context(rows: np.ndarray, *, gpu: GpuSpec, calibration: KernelCalibration) -> FloatArray:
    """Predicted prefill attention times; rows as in h100_sxm_attention_context.csv (one-token queries run the
    decode kernel, as the engines dispatch them)."""
    prefill = _predict_prefill(rows, gpu=gpu, calibration=calibration)
    one_token = _f(rows, "input_len") <= 1
    if not one_token.any():
        return prefill
    out: FloatArray = np.where(one_token, predict_attention_generation(rows, gpu=gpu, calibration=calibration), prefill)
    return out


def _predict_prefill(rows: np.ndarray, *, gpu: GpuSpec, calibration: KernelCalibration) -> FloatArray:
    b, s, past = _f(rows, "batch_size"), _f(rows, "input_len"), _f(rows, "past_kv_len")
    heads, kv_heads, head_dim = _f(rows, "num_heads"), _f(rows, "num_key_value_heads"), _f(rows, "head_dim")
    fp8 = rows["kv_cache_dtype"] == "fp8"
    distinct, index = np.unique(np.stack([heads, kv_heads, head_dim], axis=1), axis=0, return_inverse=True)
    per_shape = np.array([prefill_tile_shape(h, kv, d, calibration) for h, kv, d in distinct]).reshape(-1, 4)
    units, rows_per_token, tile_m, tile_n = per_shape[index.ravel()].T
    query_tiles, key_tiles, longest = prefill_chunk_tiles(
        past, s, rows_per_token=rows_per_token, tile_m=tile_m, tile_n=tile_n
    )
    return attention_prefill_time_s(
        query_tiles=b * query_tiles,
        key_tiles=b * key_tiles,
        longest_key_tiles=longest,
        head_units=units,
        tile_m=tile_m,
        tile_n=tile_n,
        head_dim=head_dim,
        query_tokens=b * s,
        kv_tokens_read=b * (s + past),
        heads_per_gpu=heads,
        kv_heads_per_gpu=kv_heads,
        kv_bytes_per_element=np.where(fp8, DType.FP8.bytes_per_element, DType.BF16.bytes_per_element),
        fp8_kv=fp8,
        gpu=gpu,
        calibration=calibration,
    )


def predict_attention_generation(rows: np.ndarray, *, gpu: GpuSpec, calibration: KernelCalibration) -> FloatArray:
    """Predicted decode attention times; rows as in h100_sxm_attention_generation.csv."""
    c = calibration
    b, ctx = _f(rows, "batch_size"), _f(rows, "past_kv_len") + 1
    fp8 = rows["kv_cache_dtype"] == "fp8"
    kv_bytes = np.where(fp8, DType.FP8.bytes_per_element, DType.BF16.bytes_per_element)
    eff_by_dtype = c.attention_decode_bandwidth_efficiency
    eff = np.where(fp8, eff_by_dtype.get(DType.FP8, eff_by_dtype[DType.BF16]), eff_by_dtype[DType.BF16])
    heads, kv_heads, hd = _f(rows, "num_heads"), _f(rows, "num_key_value_heads"), _f(rows, "head_dim")
    return attention_decode_times_s(
        sequences=b,
        context_tokens=b * ctx,
        kv_bytes_per_token=2 * kv_heads * hd * kv_bytes,
        bandwidth_efficiency=eff,
        flops=4.0 * heads * hd * b * ctx,
        kv_heads=kv_heads,
        head_dim=hd,
        fp8_kv=fp8,
        gpu=gpu,
        calibration=c,
    )


def _message_bytes(rows: np.ndarray) -> FloatArray:
    per_elem = np.array([NCCL_DTYPE_BYTES.get(str(d), 2.0) for d in rows["dtype"]])
    out: FloatArray = _f(rows, "message_elems") * per_elem
    return out


def predict_collective(rows: np.ndarray, *, gpu: GpuSpec, calibration: KernelCalibration) -> FloatArray:
    """Predicted NCCL times; rows as in h100_sxm_nccl.csv."""
    pred = np.full(rows.size, np.nan)
    size, gpus = _message_bytes(rows), _f(rows, "num_gpus")
    for op in np.unique(rows["op_name"]):
        sel = rows["op_name"] == op
        pred[sel] = collective_times_s(
            str(op),
            size[sel],
            gpus[sel],
            link_bandwidth_bytes_per_s=gpu.intra_node_bandwidth_bytes_per_s,
            calibration=calibration,
        )
    return pred


def predict_custom_allreduce(rows: np.ndarray, *, gpu: GpuSpec, calibration: KernelCalibration) -> FloatArray:
    """Predicted vLLM custom all-reduce times (graph-captured); rows as in h100_sxm_custom_allreduce.csv."""
    return custom_all_reduce_times_s(
        _message_bytes(rows),
        _f(rows, "num_gpus"),
        link_bandwidth_bytes_per_s=gpu.intra_node_bandwidth_bytes_per_s,
        calibration=calibration,
    )


Predictor = Callable[..., FloatArray]
PREDICTORS: dict[str, Predictor] = {
    "gemm": predict_gemm,
    "attention_context": predict_attention_context,
    "attention_generation": predict_attention_generation,
    "nccl": predict_collective,
    "custom_allreduce": predict_custom_allreduce,
}


def op_kinds(table: str, rows: np.ndarray) -> np.ndarray:
    """The op kind each row is scored under (one line of the error table per kind)."""
    if table == "gemm":
        return np.char.add("gemm_", rows["dtype"].astype(str))
    if table == "attention_context":
        return np.full(rows.size, "attention_prefill")
    if table == "attention_generation":
        return np.full(rows.size, "attention_decode")
    if table == "nccl":
        return rows["op_name"].astype(str)
    return np.char.add("custom_all_reduce_", np.char.replace(rows["kernel_source"].astype(str), "vLLM_custom_", ""))


def usable_rows(table: str, rows: np.ndarray) -> np.ndarray:
    """Rows the model describes: graph-captured custom all-reduce only (decode runs inside CUDA graphs)."""
    if table == "custom_allreduce":
        sel: np.ndarray = rows["kernel_source"] == "vLLM_custom_graph"
        return sel
    return np.ones(rows.size, dtype=bool)


def kernel_errors(
    tables: Mapping[str, np.ndarray],
    *,
    gpu: GpuSpec,
    calibration: KernelCalibration,
    masks: Mapping[str, np.ndarray] | None = None,
) -> list[ErrorSummary]:
    """Errors per op kind over every table present (optionally only the rows a mask selects)."""
    out = []
    for table in TABLES:
        if table not in tables:
            continue
        rows = tables[table]
        keep = usable_rows(table, rows)
        if masks is not None and table in masks:
            keep = keep & masks[table]
        rows = rows[keep]
        pred = PREDICTORS[table](rows, gpu=gpu, calibration=calibration)
        kinds = op_kinds(table, rows)
        for kind in sorted(set(kinds.tolist())):
            sel = kinds == kind
            out.append(summarize(kind, pred[sel], measured_s(rows[sel])))
    return out


def moe_kernel_errors(
    tables: Mapping[str, np.ndarray],
    *,
    gpu: GpuSpec,
    calibration: MoeCalibration,
    masks: Mapping[str, np.ndarray] | None = None,
) -> list[ErrorSummary]:
    """Errors of the MoE layer per expert kernel (``moe_<kernel>``, see ``moe_fit.table_kernel``), all-to-all per
    backend and phase (``alltoall_deepep_ll_dispatch``...) and MLA (``mla_prefill``, ``mla_decode``, ``mla_bmm``)."""
    from service.planning.mla_cost import MlaCalibration
    from service.planning.moe_fit import (
        ALLTOALL_MODES,
        predict_alltoall_rows,
        predict_mla,
        predict_moe_rows,
        prepare_alltoall_rows,
        prepare_moe_rows,
    )

    def selected(table: str) -> np.ndarray | None:
        rows = tables.get(table)
        if rows is None or rows.size == 0:
            return None
        if masks is not None and table in masks:
            rows = rows[masks[table]]
        return rows if rows.size else None

    out: list[ErrorSummary] = []
    rows = selected("moe")
    if rows is not None:
        prepared = prepare_moe_rows(rows, gpu)
        pred = predict_moe_rows(prepared, gpu, calibration)
        for kernel in sorted(set(prepared.kernel.tolist())):
            sel = prepared.kernel == kernel
            out.append(summarize(f"moe_{kernel}", pred[sel], prepared.measured_s[sel]))
    rows = selected("moe_alltoall")
    if rows is not None:
        for backend, mode in ALLTOALL_MODES.items():
            a2a = prepare_alltoall_rows(rows, backend)
            if a2a.tokens.size == 0:
                continue
            pred = predict_alltoall_rows(a2a, gpu, mode, calibration)
            for phase in ("dispatch", "combine"):
                sel = a2a.phase == phase
                out.append(summarize(f"alltoall_{backend}_{phase}", pred[sel], a2a.measured_s[sel]))
    mla = MlaCalibration().with_overrides(calibration.mla)
    for table, kind in (("mla_context", "mla_prefill"), ("mla_generation", "mla_decode"), ("mla_bmm", "mla_bmm")):
        rows = selected(table)
        if rows is not None:
            out.append(summarize(kind, predict_mla(table, rows, gpu, mla), measured_s(rows)))
    return out
