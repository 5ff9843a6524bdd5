"""Tiny model, GPU, engine and step-cost builders shared by the hand-checked and property tests.

Each builder returns the round-number spec below; keyword arguments replace single fields, so a test names
only what differs from it. The hand arithmetic in the tests is worked out from these values:

- ``tiny_dense``: 4 layers, hidden 64, 8 query heads and 2 KV heads of 16 dims, SwiGLU FFN 128, vocab 1000;
- ``tiny_moe``: the same trunk with ``tiny_experts`` FFNs: 16 experts of width 64 (top-2), one shared expert
  of width 64, first layer dense;
- ``gpu_spec``: 80 GB, 1 TB/s HBM, 1 PFLOP/s bf16 and 2 PFLOP/s fp8, 100 GB/s within a node of 8 and 10 GB/s
  across nodes, 100 SMs, 1 USD an hour;
- ``engine_spec``: 100 us per step + 1 us per sequence, 5 us launches, CUDA graphs up to 64 sequences, no
  overlap scheduling, 512 batched tokens and 64 sequences, chunked and mixed batches, 0.9 of GPU memory.
"""

from __future__ import annotations

from typing import Any

from service.planning.kernels import KernelCalibration
from service.planning.moe_cost import MoeCalibration
from service.planning.specs import DType, EngineSpec, GpuSpec, ModelSpec, MoESpec
from service.planning.stepcost import ParallelLayout, ReplicaStepCost


def tiny_dense(**fields: Any) -> ModelSpec:
    """A dense GQA model (see the module docstring), with ``fields`` replaced."""
    base: dict[str, Any] = {
        "name": "tiny-dense",
        "num_layers": 4,
        "hidden_size": 64,
        "num_attention_heads": 8,
        "num_kv_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "vocab_size": 1000,
    }
    return ModelSpec(**{**base, **fields})


def tiny_experts(**fields: Any) -> MoESpec:
    """16 experts of width 64 (top-2), one shared expert of width 64, first layer dense."""
    base: dict[str, Any] = {
        "num_experts": 16,
        "experts_per_token": 2,
        "expert_intermediate_size": 64,
        "num_shared_experts": 1,
        "shared_expert_intermediate_size": 64,
        "num_dense_layers": 1,
    }
    return MoESpec(**{**base, **fields})


def tiny_moe(**fields: Any) -> ModelSpec:
    """``tiny_dense``'s trunk with ``tiny_experts`` FFNs, with ``fields`` replaced."""
    return tiny_dense(**{"name": "tiny-moe", "moe": tiny_experts(), **fields})


def gpu_spec(**fields: Any) -> GpuSpec:
    """A round-number GPU (see the module docstring), with ``fields`` replaced."""
    base: dict[str, Any] = {
        "name": "test-gpu",
        "memory_bytes": 80.0e9,
        "hbm_bandwidth_bytes_per_s": 1.0e12,
        "peak_flops_per_s": {DType.BF16: 1.0e15, DType.FP8: 2.0e15},
        "intra_node_bandwidth_bytes_per_s": 1.0e11,
        "inter_node_bandwidth_bytes_per_s": 1.0e10,
        "gpus_per_node": 8,
        "price_per_hour_usd": 1.0,
        "num_sms": 100,
    }
    return GpuSpec(**{**base, **fields})


def engine_spec(**fields: Any) -> EngineSpec:
    """A round-number engine (see the module docstring), with ``fields`` replaced."""
    base: dict[str, Any] = {
        "name": "test-engine",
        "step_overhead_s": 1.0e-4,
        "per_sequence_overhead_s": 1.0e-6,
        "kernel_launch_s": 5.0e-6,
        "cuda_graphs": True,
        "cuda_graph_max_batch": 64,
        "overlap_scheduling": False,
        "max_num_batched_tokens": 512,
        "max_num_seqs": 64,
        # NCCL all-reduces unless a test turns the engine's own kernels on (hand-checked sums stay simple).
        "custom_all_reduce": False,
        "chunked_prefill": True,
        "mixed_batches": True,
        "gpu_memory_fraction": 0.9,
    }
    return EngineSpec(**{**base, **fields})


def step_cost(
    model: ModelSpec,
    layout: ParallelLayout,
    *,
    gpu: GpuSpec,
    engine: EngineSpec,
    max_tokens: int,
    calibration: KernelCalibration,
    moe_calibration: MoeCalibration | None = None,
    weight_dtype: DType = DType.BF16,
) -> ReplicaStepCost:
    """A replica's step cost with a bf16 KV cache."""
    return ReplicaStepCost(
        model=model,
        gpu=gpu,
        engine=engine,
        layout=layout,
        weight_dtype=weight_dtype,
        kv_dtype=DType.BF16,
        calibration=calibration,
        max_tokens=max_tokens,
        moe_calibration=moe_calibration,
    )
