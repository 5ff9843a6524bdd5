"""Kernel-level time model: the adapted roofline with efficiencies, occupancy and launch floors."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from service.planning.specs import DType, GpuSpec

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class KernelCalibration:
    """Efficiencies and floors that turn datasheet peaks into kernel times (fitted on measured kernels)."""

    # Dense GEMM: eff = peak_eff * m/(m+m_half) * n/(n+n_half) * k/(k+k_half), blended with the memory roof.
    gemm_peak_efficiency: dict[DType, float] = field(
        default_factory=lambda: {DType.BF16: 0.90, DType.FP8: 0.94, DType.INT8: 0.75, DType.FP4: 0.55}
    )
    gemm_m_half: float = 90.0
    gemm_n_half: float = 200.0
    gemm_k_half: float = 100.0
    # Scaled (fp8/int8/fp4) GEMMs quantize activations and saturate only at much larger n and k.
    scaled_gemm_m_half: float = 200.0
    scaled_gemm_n_half: float = 3300.0
    scaled_gemm_k_half: float = 900.0
    gemm_bandwidth_efficiency: float = 0.86
    gemm_blend_power: float = 6.0
    gemm_launch_s: float = 3.0e-6
    # Weight-only 4-bit GEMMs dequantize in the kernel: their compute roof is the bf16 roof times this.
    weight_only_compute_factor: float = 0.6
    # Grouped (MoE) GEMMs reach a fraction of a dense GEMM's compute efficiency.
    grouped_gemm_factor: float = 0.7
    # Prefill attention: FLOPs/(peak*eff*occupancy**occupancy_power); per-query-token fixed work in keys.
    attention_prefill_efficiency: float = 0.60
    attention_prefill_overhead_keys: float = 400.0
    attention_prefill_occupancy_power: float = 0.67
    attention_prefill_query_tile: int = 128
    attention_launch_s: float = 1.2e-5
    # Decode attention: KV bytes/(bw*eff) plus a per-sequence cost.
    attention_decode_bandwidth_efficiency: dict[DType, float] = field(
        default_factory=lambda: {DType.BF16: 0.85, DType.FP8: 0.70}
    )
    attention_decode_per_sequence_s: float = 4.0e-8
    # Collectives: latency alpha(n) = base + per_hop*log2(n); bandwidth at bus efficiency of the link.
    collective_base_latency_s: float = 3.0e-6
    collective_latency_per_log2_gpu_s: float = 3.5e-6
    collective_bus_efficiency: float = 0.80
    # Element-wise kernels (norms, rotary, activation, residual): bandwidth efficiency and per-kernel floor.
    elementwise_bandwidth_efficiency: float = 0.75
    elementwise_launch_s: float = 2.0e-6
    # Streaming multiprocessors of the GPU the fit was made on; occupancy scales by the target's count.
    reference_num_sms: int = 132

    def with_overrides(self, overrides: dict[str, Any]) -> KernelCalibration:
        """A copy with the named fields replaced (dtype-keyed mappings accept dtype names)."""
        known = {f.name for f in fields(self)}
        values: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in known:
                raise ValueError(f"unknown calibration field {key!r}")
            if isinstance(value, dict):
                value = {DType(k): float(v) for k, v in value.items()}
            values[key] = value
        return replace(self, **values)


def gemm_time_s(
    m: FloatArray | float,
    n: float,
    k: float,
    *,
    gpu: GpuSpec,
    weight_dtype: DType,
    calibration: KernelCalibration,
    grouped: bool = False,
) -> FloatArray:
    """Time of C[m,n] = A[m,k] W[k,n] on one GPU (vectorised over m)."""
    m_arr = np.asarray(m, dtype=np.float64)
    c = calibration
    weight_only = weight_dtype in (DType.INT4,)
    math_dtype = DType.BF16 if weight_only else weight_dtype
    peak = gpu.peak_for(math_dtype)
    eff = c.gemm_peak_efficiency.get(math_dtype, c.gemm_peak_efficiency[DType.BF16])
    if weight_only:
        eff *= c.weight_only_compute_factor
    if grouped:
        eff *= c.grouped_gemm_factor
    scaled = math_dtype in (DType.FP8, DType.INT8, DType.FP4)
    m_half = c.scaled_gemm_m_half if scaled else c.gemm_m_half
    n_half = c.scaled_gemm_n_half if scaled else c.gemm_n_half
    k_half = c.scaled_gemm_k_half if scaled else c.gemm_k_half
    shape_eff = eff * (m_arr / (m_arr + m_half)) * (n / (n + n_half)) * (k / (k + k_half))
    flops = 2.0 * m_arr * n * k
    act_bytes = 1.0 if scaled else 2.0
    moved_bytes = k * n * weight_dtype.bytes_per_element + m_arr * k * act_bytes + m_arr * n * 2.0
    t_compute = flops / (peak * np.maximum(shape_eff, 1e-6))
    t_memory = moved_bytes / (gpu.hbm_bandwidth_bytes_per_s * c.gemm_bandwidth_efficiency)
    p = c.gemm_blend_power
    blended = (t_compute**p + t_memory**p) ** (1.0 / p)
    return np.where(m_arr > 0, blended + c.gemm_launch_s, 0.0)


def _occupancy(work_items: float, num_sms: int) -> float:
    """Fraction of SM slots busy over the waves needed for ``work_items`` thread blocks."""
    if work_items <= 0:
        return 1.0
    waves = math.ceil(work_items / num_sms)
    return work_items / (waves * num_sms)


def attention_prefill_time_s(
    *,
    query_tokens: float,
    attended_key_pairs: float,
    query_blocks: float,
    heads_per_gpu: float,
    kv_heads_per_gpu: float,
    head_dim: float,
    kv_tokens_read: float,
    kv_dtype: DType,
    gpu: GpuSpec,
    num_sms: int,
    calibration: KernelCalibration,
) -> float:
    """One layer of (chunked) prefill attention over a batch, on one GPU."""
    if query_tokens <= 0:
        return 0.0
    c = calibration
    occupancy = _occupancy(heads_per_gpu * query_blocks, num_sms) ** c.attention_prefill_occupancy_power
    flops = 4.0 * heads_per_gpu * head_dim * (attended_key_pairs + c.attention_prefill_overhead_keys * query_tokens)
    t_compute = flops / (gpu.peak_for(DType.BF16) * c.attention_prefill_efficiency * occupancy)
    moved = kv_tokens_read * kv_heads_per_gpu * head_dim * 2 * kv_dtype.bytes_per_element
    moved += 2.0 * query_tokens * heads_per_gpu * head_dim * 2.0
    t_memory = moved / (gpu.hbm_bandwidth_bytes_per_s * c.gemm_bandwidth_efficiency)
    return float(c.attention_launch_s + t_compute + t_memory)


def attention_decode_time_s(
    *,
    sequences: float,
    context_tokens: float,
    kv_bytes_per_token: float,
    kv_dtype: DType,
    flops: float,
    gpu: GpuSpec,
    calibration: KernelCalibration,
) -> float:
    """One layer of decode attention (one new token per sequence), on one GPU."""
    if sequences <= 0:
        return 0.0
    c = calibration
    eff = c.attention_decode_bandwidth_efficiency.get(kv_dtype, c.attention_decode_bandwidth_efficiency[DType.BF16])
    t_memory = context_tokens * kv_bytes_per_token / (gpu.hbm_bandwidth_bytes_per_s * eff)
    t_compute = flops / (gpu.peak_for(DType.BF16) * c.attention_prefill_efficiency)
    per_sequence = c.attention_decode_per_sequence_s * sequences * (3.35e12 / gpu.hbm_bandwidth_bytes_per_s)
    return float(c.attention_launch_s + per_sequence + max(t_memory, t_compute))


def collective_time_s(
    kind: str,
    message_bytes: float,
    num_gpus: int,
    *,
    link_bandwidth_bytes_per_s: float,
    calibration: KernelCalibration,
) -> float:
    """Time of one collective over ``num_gpus`` GPUs (ring/tree cost with a latency floor)."""
    if num_gpus <= 1 or message_bytes <= 0:
        return 0.0
    c = calibration
    n = float(num_gpus)
    factor = {"all_reduce": 2.0 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n}.get(
        kind, (n - 1) / n
    )
    latency = c.collective_base_latency_s + c.collective_latency_per_log2_gpu_s * math.log2(n)
    return latency + factor * message_bytes / (link_bandwidth_bytes_per_s * c.collective_bus_efficiency)


def elementwise_time_s(moved_bytes: float, kernels: int, *, gpu: GpuSpec, calibration: KernelCalibration) -> float:
    """Memory-bound element-wise kernels moving ``moved_bytes`` in total."""
    c = calibration
    return kernels * c.elementwise_launch_s + moved_bytes / (
        gpu.hbm_bandwidth_bytes_per_s * c.elementwise_bandwidth_efficiency
    )
