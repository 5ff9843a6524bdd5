"""Mixture-of-experts cost: experts touched per GPU, grouped-GEMM time and expert-parallel all-to-all."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from service.planning.kernels import FloatArray
from service.planning.specs import DType, GpuSpec

# Routing skew names as in the kernel tables: balanced (uniform) or power_law_<exponent>.
BALANCED = "balanced"


@dataclass(frozen=True, slots=True)
class MoeCalibration:
    """Efficiencies and overheads of the fused-MoE layer and DeepEP-style all-to-all (fitted on kernels)."""

    # Per expert kernel (named as in the kernel tables, see KERNELS): grouped-GEMM compute efficiency
    # (fraction of the math dtype's datasheet peak) and achieved fraction of HBM bandwidth while the
    # touched experts' weights stream in. Kernels differ: vLLM's per-tensor fp8 path is far slower
    # on Hopper than its block-scaled one.
    compute_efficiency: dict[str, float] = field(default_factory=lambda: {"bf16": 0.55})
    bandwidth_efficiency: dict[str, float] = field(default_factory=lambda: {"bf16": 0.8})
    # Tokens each expert's GEMM is padded to (the kernel's M tile): an expert with 1 token costs a tile.
    tile_tokens: float = 64.0
    # Fixed cost of one fused-MoE layer: routing top-k, sort/align, activation quantisation, launches.
    fixed_s: float = 4.0e-5
    # Per local token-expert pair: permute, un-permute and the weighted sum.
    per_pair_s: float = 2.0e-9
    # bf16 passes over the routed activations (tokens x top-k x hidden) of every token entering the layer:
    # permutation, intermediate caches and the weighted sum span all routed slots even when this GPU holds
    # few of the experts.
    routed_activation_passes: float = 4.0
    # Roofline blend power: larger is closer to max(compute, memory).
    blend_power: float = 4.0
    # All-to-all: fixed latency per phase and achieved share of the link bandwidth, by kernel mode.
    alltoall_latency_s: dict[str, float] = field(default_factory=lambda: {"low_latency": 3.0e-5, "normal": 8.0e-5})
    alltoall_bandwidth_efficiency: dict[str, float] = field(
        default_factory=lambda: {"low_latency": 0.35, "normal": 0.55}
    )

    def with_overrides(self, overrides: dict[str, Any]) -> MoeCalibration:
        """A copy with the named fields replaced (dtype-keyed mappings accept dtype names)."""
        known = {f.name: f for f in fields(self)}
        values: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in known:
                raise ValueError(f"unknown MoE calibration field {key!r}")
            if isinstance(value, dict):
                value = {str(k): float(v) for k, v in value.items()}
            values[key] = value
        return replace(self, **values)


def routing_probabilities(num_experts: int, distribution: str = BALANCED) -> FloatArray:
    """Probability that a routed slot lands on each expert (power law: rank^-exponent, normalised)."""
    if distribution == BALANCED:
        return np.full(num_experts, 1.0 / num_experts)
    if not distribution.startswith("power_law_"):
        raise ValueError(f"unknown routing distribution {distribution!r}")
    exponent = float(distribution.removeprefix("power_law_"))
    weights = np.arange(1, num_experts + 1, dtype=np.float64) ** -exponent
    out: FloatArray = weights / weights.sum()
    return out


def expected_touched_experts(
    tokens: FloatArray | float, *, num_experts: int, topk: int, local_experts: int, distribution: str = BALANCED
) -> FloatArray:
    """Expected distinct experts on one GPU hit by ``tokens`` tokens each routed to ``topk`` experts."""
    n = np.asarray(tokens, dtype=np.float64)
    if distribution == BALANCED:
        # Each token picks topk distinct experts: an expert is missed by a token with prob 1 - k/E.
        miss = np.power(1.0 - topk / num_experts, n)
        out: FloatArray = local_experts * (1.0 - miss)
        return out
    # Skewed routing: the GPU holds a typical slice (every moe_ep-th expert by popularity rank).
    probs = routing_probabilities(num_experts, distribution)
    stride = max(1, num_experts // max(1, local_experts))
    local = probs[::stride][:local_experts]
    pick = np.minimum(1.0, topk * local)
    skewed: FloatArray = np.sum(1.0 - np.power(1.0 - pick[None, :], n.reshape(-1, 1)), axis=1).reshape(n.shape)
    return skewed


def local_pair_share(num_experts: int, local_experts: int, topk: int, distribution: str = BALANCED) -> float:
    """Expected token-expert pairs per token that land on one GPU's experts."""
    if distribution == BALANCED:
        return topk * local_experts / num_experts
    probs = routing_probabilities(num_experts, distribution)
    stride = max(1, num_experts // max(1, local_experts))
    # The most loaded GPU (holding the most popular experts) sets the lock-step layer time.
    return float(topk * np.minimum(1.0, probs[::stride][:local_experts] * stride).sum())


def moe_routing(
    tokens: FloatArray | float,
    *,
    num_experts: int,
    local_experts: int,
    topk: int,
    distribution: str = BALANCED,
) -> tuple[FloatArray, FloatArray]:
    """Expected (touched local experts, token-expert pairs on this GPU) for ``tokens`` entering the layer."""
    n = np.asarray(tokens, dtype=np.float64)
    touched = expected_touched_experts(
        n, num_experts=num_experts, topk=topk, local_experts=local_experts, distribution=distribution
    )
    pairs: FloatArray = n * local_pair_share(num_experts, local_experts, topk, distribution)
    return touched, pairs


def moe_time_from_routing_s(
    tokens: FloatArray,
    touched: FloatArray,
    pairs: FloatArray,
    *,
    hidden_size: FloatArray | float,
    expert_width_per_gpu: FloatArray | float,
    weight_bytes_per_element: FloatArray | float,
    peak_flops_per_s: FloatArray | float,
    compute_efficiency: FloatArray | float,
    bandwidth_efficiency: FloatArray | float,
    hbm_bandwidth_bytes_per_s: float,
    topk: FloatArray | float,
    calibration: MoeCalibration,
    gated: bool = True,
) -> FloatArray:
    """Fused-MoE layer time from its routing (vectorised over rows for fitting)."""
    c = calibration
    matrices = 3.0 if gated else 2.0
    params_per_expert = matrices * np.asarray(hidden_size) * expert_width_per_gpu
    weight_bytes = touched * params_per_expert * weight_bytes_per_element
    # Each touched expert's GEMM runs in whole M tiles: few tokens per expert still cost a tile.
    per_expert = pairs / np.maximum(touched, 1e-9)
    padded_pairs = touched * np.ceil(per_expert / c.tile_tokens) * c.tile_tokens
    t_compute = 2.0 * padded_pairs * params_per_expert / (peak_flops_per_s * compute_efficiency)
    act_bytes = pairs * (2.0 * np.asarray(hidden_size) + matrices * expert_width_per_gpu) * 2.0
    act_bytes = act_bytes + tokens * np.asarray(hidden_size) * 4.0
    t_memory = (weight_bytes + act_bytes) / (hbm_bandwidth_bytes_per_s * bandwidth_efficiency)
    p = c.blend_power
    blended = (t_compute**p + t_memory**p) ** (1.0 / p)
    routed_bytes = c.routed_activation_passes * tokens * topk * np.asarray(hidden_size) * 2.0
    overhead = c.fixed_s + c.per_pair_s * pairs + routed_bytes / hbm_bandwidth_bytes_per_s
    out: FloatArray = np.where(tokens > 0, blended + overhead, 0.0)
    return out


# Expert kernels: name -> math dtype of the GEMMs (weights dequantised to it where it differs).
KERNELS: dict[str, DType] = {
    "bf16": DType.BF16,
    "fp8": DType.FP8,
    "fp8_block": DType.FP8,
    "nvfp4": DType.FP4,
    "int4_wo": DType.BF16,
    "w4a16_mxfp4": DType.BF16,
    "w4a8_mxfp4_mxfp8": DType.FP8,
}


def expert_kernel(weight_dtype: DType, gpu: GpuSpec) -> str:
    """The fused-MoE kernel engines run for ``weight_dtype`` experts on ``gpu``."""
    if weight_dtype is DType.FP8:
        # FP8 MoE checkpoints (DeepSeek, Qwen3, MiniMax) are block-scaled: the engines' block-fp8 path.
        return "fp8_block" if gpu.runs_natively(DType.FP8) else "int4_wo"
    if weight_dtype is DType.FP4:
        return "nvfp4" if gpu.runs_natively(DType.FP4) else "w4a16_mxfp4"
    if weight_dtype is DType.MXFP4:
        return "w4a8_mxfp4_mxfp8" if gpu.runs_natively(DType.MXFP4) else "w4a16_mxfp4"
    if weight_dtype is DType.INT4:
        return "int4_wo"
    return "bf16"


def kernel_efficiencies(kernel: str, calibration: MoeCalibration) -> tuple[float, float]:
    """(compute, bandwidth) efficiency of an expert kernel, falling back to the bf16 kernel's."""
    c = calibration
    compute = c.compute_efficiency.get(kernel, c.compute_efficiency["bf16"])
    bandwidth = c.bandwidth_efficiency.get(kernel, c.bandwidth_efficiency["bf16"])
    return compute, bandwidth


def moe_layer_time_s(
    tokens: FloatArray | float,
    *,
    hidden_size: int,
    expert_width_per_gpu: float,
    num_experts: int,
    local_experts: int,
    topk: int,
    weight_dtype: DType,
    gpu: GpuSpec,
    calibration: MoeCalibration,
    gated: bool = True,
    distribution: str = BALANCED,
    kernel: str | None = None,
) -> FloatArray:
    """Fused-MoE layer on one GPU: ``tokens`` enter (all ranks' tokens under expert parallelism)."""
    n = np.asarray(tokens, dtype=np.float64)
    touched, pairs = moe_routing(
        n, num_experts=num_experts, local_experts=local_experts, topk=topk, distribution=distribution
    )
    name = kernel or expert_kernel(weight_dtype, gpu)
    compute_eff, bandwidth_eff = kernel_efficiencies(name, calibration)
    return moe_time_from_routing_s(
        n,
        touched,
        pairs,
        hidden_size=hidden_size,
        expert_width_per_gpu=expert_width_per_gpu,
        weight_bytes_per_element=weight_dtype.bytes_per_element,
        peak_flops_per_s=gpu.peak_for(KERNELS[name]),
        compute_efficiency=compute_eff,
        bandwidth_efficiency=bandwidth_eff,
        hbm_bandwidth_bytes_per_s=gpu.hbm_bandwidth_bytes_per_s,
        topk=topk,
        calibration=calibration,
        gated=gated,
    )


def expected_destination_ranks(topk: int, ep_ranks: int) -> float:
    """Distinct EP ranks a token is sent to (DeepEP sends a token once per rank, not per expert)."""
    if ep_ranks <= 1:
        return 0.0
    return ep_ranks * (1.0 - (1.0 - 1.0 / ep_ranks) ** topk)


def alltoall_time_s(
    tokens_per_gpu: FloatArray | float,
    *,
    hidden_size: int,
    topk: int,
    ep_ranks: int,
    bytes_per_element: float,
    intra_bandwidth_bytes_per_s: float,
    inter_bandwidth_bytes_per_s: float,
    ranks_per_domain: int,
    mode: str,
    calibration: MoeCalibration,
) -> FloatArray:
    """One dispatch or combine phase of expert-parallel all-to-all over ``ep_ranks`` GPUs."""
    n = np.asarray(tokens_per_gpu, dtype=np.float64)
    if ep_ranks <= 1:
        return np.zeros_like(n)
    c = calibration
    destinations = expected_destination_ranks(topk, ep_ranks)
    # Ranks other than this one, split into those on the scale-up fabric and those across the network.
    local_peers = max(0, min(ranks_per_domain, ep_ranks) - 1)
    remote_peers = ep_ranks - 1 - local_peers
    per_peer = n * hidden_size * bytes_per_element * destinations / ep_ranks
    eff = c.alltoall_bandwidth_efficiency.get(mode, c.alltoall_bandwidth_efficiency["normal"])
    t_local = per_peer * local_peers / (intra_bandwidth_bytes_per_s * eff)
    t_remote = per_peer * remote_peers / (inter_bandwidth_bytes_per_s * eff)
    latency = c.alltoall_latency_s.get(mode, c.alltoall_latency_s["normal"])
    out: FloatArray = np.where(n > 0, latency + np.maximum(t_local, t_remote), 0.0)
    return out
