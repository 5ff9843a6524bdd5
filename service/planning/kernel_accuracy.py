"""Kernel-level error of the calibrated roofline against measured kernel tables (arrays in, errors out)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.planning.kernels import (
    FloatArray,
    KernelCalibration,
    attention_decode_time_s,
    attention_prefill_time_s,
    collective_time_s,
    gemm_time_s,
)
from service.planning.specs import DType, GpuSpec


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
    return ErrorSummary(kind, int(err.size), float(np.median(err)), float(np.percentile(err, 90)))


def gemm_errors(rows: np.ndarray, *, gpu: GpuSpec, calibration: KernelCalibration) -> list[ErrorSummary]:
    """Errors per GEMM dtype; rows have fields dtype, m, n, k, latency_ms."""
    out = []
    for name in np.unique(rows["dtype"]):
        sel = rows[rows["dtype"] == name]
        pred = gemm_time_s(
            sel["m"].astype(np.float64),
            sel["n"].astype(np.float64),
            sel["k"].astype(np.float64),
            gpu=gpu,
            weight_dtype=DType(str(name)),
            calibration=calibration,
        )
        out.append(summarize(f"gemm_{name}", pred, sel["latency_ms"] * 1e-3))
    return out


def attention_context_errors(rows: np.ndarray, *, gpu: GpuSpec, calibration: KernelCalibration) -> ErrorSummary:
    """Errors of prefill attention; rows as in h100_sxm_attention_context.csv."""
    pred = np.empty(rows.size)
    tile = calibration.attention_prefill_query_tile
    for i, r in enumerate(rows):
        b, s, past = float(r["batch_size"]), float(r["input_len"]), float(r["past_kv_len"])
        pred[i] = attention_prefill_time_s(
            query_tokens=b * s,
            attended_key_pairs=b * s * (past + (s + 1) / 2),
            query_blocks=b * np.ceil(s / tile),
            heads_per_gpu=float(r["num_heads"]),
            kv_heads_per_gpu=float(r["num_key_value_heads"]),
            head_dim=float(r["head_dim"]),
            kv_tokens_read=b * (s + past),
            kv_dtype=DType(str(r["kv_cache_dtype"])),
            gpu=gpu,
            num_sms=gpu.num_sms,
            calibration=calibration,
        )
    return summarize("attention_prefill", pred, rows["latency_ms"] * 1e-3)


def attention_generation_errors(rows: np.ndarray, *, gpu: GpuSpec, calibration: KernelCalibration) -> ErrorSummary:
    """Errors of decode attention; rows as in h100_sxm_attention_generation.csv."""
    pred = np.empty(rows.size)
    for i, r in enumerate(rows):
        b, ctx = float(r["batch_size"]), float(r["past_kv_len"]) + 1
        kv_dtype = DType(str(r["kv_cache_dtype"]))
        heads, kv_heads, hd = float(r["num_heads"]), float(r["num_key_value_heads"]), float(r["head_dim"])
        pred[i] = attention_decode_time_s(
            sequences=b,
            context_tokens=b * ctx,
            kv_bytes_per_token=2 * kv_heads * hd * kv_dtype.bytes_per_element,
            kv_dtype=kv_dtype,
            flops=4.0 * heads * hd * b * ctx,
            gpu=gpu,
            calibration=calibration,
        )
    return summarize("attention_decode", pred, rows["latency_ms"] * 1e-3)


def collective_errors(rows: np.ndarray, *, gpu: GpuSpec, calibration: KernelCalibration) -> list[ErrorSummary]:
    """Errors per collective kind; rows as in h100_sxm_nccl.csv."""
    out = []
    for op in np.unique(rows["op_name"]):
        sel = rows[rows["op_name"] == op]
        pred = np.array(
            [
                collective_time_s(
                    str(op),
                    float(r["message_elems"]) * (2.0 if r["dtype"] == "half" else 1.0),
                    int(r["num_gpus"]),
                    link_bandwidth_bytes_per_s=gpu.intra_node_bandwidth_bytes_per_s,
                    calibration=calibration,
                )
                for r in sel
            ]
        )
        out.append(summarize(str(op), pred, sel["latency_ms"] * 1e-3))
    return out
