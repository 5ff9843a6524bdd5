"""Hand-checked step cost: collectives, MoE kernels, a step as the sum of its parts, layout refusals.

The models, GPU and engine (tests/specs_for_tests.py) and the calibrations here have round numbers; each
expected time is either worked out by hand or assembled from the kernel functions of
service/planning/kernels.py and moe_cost.py one term at a time, so a change in how a step is put together
shows up as a mismatch.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, get_args

import numpy as np
import pytest

from service.planning.catalog import Catalog
from service.planning.deployment import build_instance
from service.planning.estimate import EstimateRequest, resolve_deployment
from service.planning.kernels import (
    KernelCalibration,
    attention_decode_time_s,
    attention_prefill_time_s,
    collective_time_s,
    custom_all_reduce_times_s,
    elementwise_time_s,
    gemm_time_s,
    prefill_chunk_tiles,
)
from service.planning.moe_cost import (
    MOE_BACKENDS,
    RANDOM,
    SERVED_ROUTINGS,
    MoeCalibration,
    alltoall_time_s,
    moe_layer_time_s,
)
from service.planning.plan_spec import MoeBackend, MoeRouting
from service.planning.schedulers import Role
from service.planning.specs import DType, EngineSpec, ModelSpec, PlanningError, SpeculativeDecoding
from service.planning.stepcost import (
    ELEMENTWISE_HIDDEN_PASSES,
    ELEMENTWISE_KERNELS_PER_LAYER,
    KERNELS_PER_LAYER,
    ParallelLayout,
    ReplicaStepCost,
    make_layout,
    validate_layout,
)
from tests.specs_for_tests import engine_spec, gpu_spec, step_cost, tiny_dense, tiny_moe

DENSE = tiny_dense()
MOE = tiny_moe()
GPU = gpu_spec()
ENGINE = engine_spec()

# Round numbers that differ from the defaults, so the step cost must read them from here.
CAL = KernelCalibration(
    gemm_launch_s=2.0e-6,
    attention_launch_s=1.0e-5,
    attention_decode_launch_s=1.0e-5,
    attention_decode_per_sequence_bytes=1.0e5,
    collective_base_latency_s=5.0e-6,
    collective_latency_per_log2_gpu_s=2.0e-6,
    collective_bus_efficiency=0.5,
    elementwise_bandwidth_efficiency=0.5,
    elementwise_launch_s=1.0e-6,
)
MOE_CAL = MoeCalibration(
    compute_efficiency={"bf16": 0.5},
    bandwidth_efficiency={"bf16": 0.5},
    tile_tokens=64.0,
    fixed_s=1.0e-5,
    per_pair_s=1.0e-9,
    routed_activation_passes=4.0,
    alltoall_latency_s={"low_latency": 1.0e-5, "normal": 4.0e-5},
    alltoall_bandwidth_efficiency={"low_latency": 0.5, "normal": 0.8},
)


def _cost(model: ModelSpec, layout: ParallelLayout, engine: EngineSpec = ENGINE) -> ReplicaStepCost:
    return step_cost(model, layout, gpu=GPU, engine=engine, max_tokens=512, calibration=CAL, moe_calibration=MOE_CAL)


def _gemm(m: float, n: float, k: float) -> float:
    return float(gemm_time_s(m, n, k, gpu=GPU, weight_dtype=DType.BF16, calibration=CAL))


# Collectives and MoE kernels by hand ---------------------------------------------------------------------


def test_all_reduce_by_hand() -> None:
    # 5 us base + 2 us x log2(2) + ring factor 2 x (2 - 1) / 2 x 1 MB / (100 GB/s x 0.5) = 5 + 2 + 20 us
    t = collective_time_s("all_reduce", 1.0e6, 2, link_bandwidth_bytes_per_s=1.0e11, calibration=CAL)
    assert t == pytest.approx(27.0e-6, rel=1e-12)
    # 8 GPUs: 5 + 2 x 3 + 2 x 7/8 x 1 MB / 50 GB/s = 11 + 35 us
    t8 = collective_time_s("all_reduce", 1.0e6, 8, link_bandwidth_bytes_per_s=1.0e11, calibration=CAL)
    assert t8 == pytest.approx(46.0e-6, rel=1e-12)
    assert collective_time_s("all_reduce", 1.0e6, 1, link_bandwidth_bytes_per_s=1.0e11, calibration=CAL) == 0


def test_all_gather_by_hand() -> None:
    # 4 GPUs: 5 + 2 x 2 us + (4 - 1) / 4 x 2 MB / 50 GB/s = 9 + 30 us
    t = collective_time_s("all_gather", 2.0e6, 4, link_bandwidth_bytes_per_s=1.0e11, calibration=CAL)
    assert t == pytest.approx(39.0e-6, rel=1e-12)
    per_kind = replace(CAL, collective_kind_base_latency_s={"all_gather": 1.0e-6})
    t_kind = collective_time_s("all_gather", 2.0e6, 4, link_bandwidth_bytes_per_s=1.0e11, calibration=per_kind)
    assert t_kind == pytest.approx(35.0e-6, rel=1e-12)


def test_alltoall_by_hand() -> None:
    # Low-latency kernels send one copy per selected expert, (4 - 1) / 4 of them to other ranks: 2 x 3/4 = 1.5
    # copies of 64 x 1 B per token; 8 tokens send 768 B, spread over 3 peers all on the scale-up fabric:
    # 768 B / (100 GB/s x 0.5) = 15.36 ns after the 10 us latency.
    t = alltoall_time_s(
        8.0,
        hidden_size=64,
        topk=2,
        ep_ranks=4,
        bytes_per_element=1.0,
        intra_bandwidth_bytes_per_s=1.0e11,
        inter_bandwidth_bytes_per_s=1.0e10,
        ranks_per_domain=8,
        mode="low_latency",
        calibration=MOE_CAL,
    )
    assert float(t) == pytest.approx(1.0e-5 + 15.36e-9, rel=1e-12)
    # Normal kernels send a token once per destination rank: 16 x (1 - (15/16)^2) = 1.9375 ranks, 15/16 of them
    # remote, 1.81640625 copies; 8 tokens x 64 x 2 B x 1.81640625 = 1_860 B over 15 peers, 7 on the fabric and 8
    # across the network: local 1_860 x 7/15 / (1e11 x 0.8) = 10.85 ns, remote 1_860 x 8/15 / (1e10 x 0.8)
    # = 124 ns; the slower side counts. A per-token cost of 10 ns adds 80 ns.
    cal = replace(MOE_CAL, alltoall_per_token_s={"normal": 1.0e-8})
    t16 = alltoall_time_s(
        8.0,
        hidden_size=64,
        topk=2,
        ep_ranks=16,
        bytes_per_element=2.0,
        intra_bandwidth_bytes_per_s=1.0e11,
        inter_bandwidth_bytes_per_s=1.0e10,
        ranks_per_domain=8,
        mode="normal",
        calibration=cal,
    )
    assert float(t16) == pytest.approx(4.0e-5 + 80e-9 + 124e-9, rel=1e-12)
    assert float(alltoall_time_s(0.0, **{**_A2A, "calibration": cal})) == 0
    assert float(alltoall_time_s(8.0, **{**_A2A, "ep_ranks": 1, "calibration": cal})) == 0


_A2A: dict[str, Any] = {
    "hidden_size": 64,
    "topk": 2,
    "ep_ranks": 16,
    "bytes_per_element": 2.0,
    "intra_bandwidth_bytes_per_s": 1.0e11,
    "inter_bandwidth_bytes_per_s": 1.0e10,
    "ranks_per_domain": 8,
    "mode": "normal",
}


def _moe(tokens: float, *, local_experts: int, topk: int) -> float:
    return float(
        moe_layer_time_s(
            tokens,
            hidden_size=64,
            expert_width_per_gpu=32,
            num_experts=4,
            local_experts=local_experts,
            topk=topk,
            weight_dtype=DType.BF16,
            gpu=GPU,
            calibration=MOE_CAL,
        )
    )


def _blend(compute: float, memory: float) -> float:
    return float((compute**4 + memory**4) ** 0.25)


def test_moe_layer_of_one_token_by_hand() -> None:
    # 1 token, top-1 of 4 experts, all local: each expert expects 1/4 token, so 4 x 1/4 = 1 expert touched,
    # 1 pair, 1 M tile in all.
    # Grouped GEMMs, each wave of CTAs costs a full wave (100 SMs) of 64 x 128 tiles:
    # up (gate + up, N = 2 x 32 = 64 -> 1 N tile, K = 64): 1 CTA, 1 wave = 100 x 2 x 64 x 128 x 64 FLOP
    # down (N = 64 -> 1 N tile, K = 32):                    1 CTA, 1 wave = 100 x 2 x 64 x 128 x 32 FLOP
    compute = (104_857_600 + 52_428_800) / (1.0e15 * 0.5)
    # one expert's weights 3 x 64 x 32 x 2 B = 12_288 + activations 1 x (2 x 64 + 3 x 32) x 2 B = 448
    # + the token in and out 64 x 4 B = 256, at 1 TB/s x 0.5
    memory = (12_288 + 448 + 256) / (1.0e12 * 0.5)
    # fixed 10 us + 1 pair x 1 ns + 4 passes x 1 token x top-1 x 64 x 2 B / 1 TB/s
    overhead = 1.0e-5 + 1.0e-9 + 512 / 1.0e12
    assert _moe(1.0, local_experts=4, topk=1) == pytest.approx(_blend(compute, memory) + overhead, rel=1e-12)
    assert _moe(0.0, local_experts=4, topk=1) == 0


def test_moe_layer_of_many_tokens_by_hand() -> None:
    # 256 tokens, top-2 of 4 experts, 2 local (ep=2): 256 x 2 / 4 = 128 pairs per expert -> 2 experts touched,
    # 256 pairs, ceil(128 / 64) = 2 M tiles each = 4 tiles.
    # up: 4 tiles x 1 N tile = 4 CTAs, down: 4 x 1 = 4 CTAs: one wave each, as for one token.
    compute = (104_857_600 + 52_428_800) / (1.0e15 * 0.5)
    # weights 2 x 12_288 = 24_576 + activations 256 x 224 x 2 = 114_688 + tokens 256 x 64 x 4 = 65_536
    memory = (24_576 + 114_688 + 65_536) / (1.0e12 * 0.5)
    # fixed 10 us + 256 pairs x 1 ns + 4 x 256 x 2 x 64 x 2 B / 1 TB/s
    overhead = 1.0e-5 + 256e-9 + 262_144 / 1.0e12
    assert _moe(256.0, local_experts=2, topk=2) == pytest.approx(_blend(compute, memory) + overhead, rel=1e-12)
    # Memory-bound here: the weights and routed activations outweigh one wave of tiles.
    assert memory > compute


# A step as the sum of its parts --------------------------------------------------------------------------


def _dense_layer_gemms(m: float, tp: int) -> float:
    heads, kv_heads = 8 / tp, max(1.0, 2 / tp)
    qkv = _gemm(m, (heads + 2 * kv_heads) * 16, 64)
    out = _gemm(m, 64, heads * 16)
    up = _gemm(m, 2 * 128 / tp, 64)
    down = _gemm(m, 64, 128 / tp)
    return qkv + out + up + down


def test_decode_step_of_one_sequence_is_the_sum_of_its_parts() -> None:
    cost = _cost(DENSE, ParallelLayout())
    ctx = 1000.0
    step = cost.step(decode_sequences=1, decode_context_tokens=ctx)
    gemm = 4 * _dense_layer_gemms(1, 1)
    lm_head = _gemm(1, 1000, 64)
    # 4 layers x decode attention over 1000 tokens of 4 x 2 x 2 x 16 x 2 B / 4 layers = 128 B per token-layer
    attention = 4 * _decode_attention_s(1, ctx)
    # Memory-bound: 1000 x 128 B / (1 TB/s x 0.85) beats 4 x 8 x 16 x 1000 FLOP / (1 PFLOP/s x 0.6).
    assert attention == pytest.approx(4 * (1.0e-5 + 1.0e5 / 1.0e12 + 128_000 / 0.85e12), rel=1e-12)
    # 1 token x (10 x 64 + 3 x 128) x 2 B = 2_048 B per layer in 5 kernels
    assert ELEMENTWISE_HIDDEN_PASSES == 10.0
    assert ELEMENTWISE_KERNELS_PER_LAYER == 5
    elementwise = 4 * elementwise_time_s(2_048, 5, gpu=GPU, calibration=CAL)
    assert elementwise == pytest.approx(4 * (5 * 1.0e-6 + 2_048 / 0.5e12), rel=1e-12)
    gpu_s = gemm + lm_head + attention + elementwise  # no communication on one GPU
    cpu_s = 1.0e-4 + 1.0e-6  # step overhead + one sequence; the decode step replays a CUDA graph (no launches)
    assert step.communication_s == 0
    assert step.gemm_s == pytest.approx(gemm + lm_head, rel=1e-12, abs=1e-12)
    assert step.attention_s == pytest.approx(attention, rel=1e-12, abs=1e-12)
    assert step.cpu_s == pytest.approx(cpu_s, rel=1e-12, abs=1e-12)
    assert step.gpu_s == pytest.approx(gpu_s, rel=1e-12, abs=1e-12)
    # Without overlap scheduling the CPU work adds to the GPU work.
    assert step.total_s == pytest.approx(gpu_s + cpu_s, rel=1e-12, abs=1e-12)


def test_one_token_prefill_chunks_run_the_decode_attention_kernel() -> None:
    cost = _cost(DENSE, ParallelLayout())
    # Three prompts whose cached prefixes leave one token each, over 300, 500 and 200 tokens of context.
    chunks = cost.step(prefill_tokens=3, prefill_kv_tokens=1000.0, prefill_sequences=3, prefill_chunks=3)
    decodes = cost.step(decode_sequences=3, decode_context_tokens=1000.0)
    assert chunks.attention_s == pytest.approx(decodes.attention_s, rel=1e-12)
    assert chunks.attention_s == pytest.approx(4 * _decode_attention_s(3, 1000.0), rel=1e-12)
    # Beside decoding sequences they join the same decode launch: one kernel over five sequences, not two.
    mixed = cost.step(
        prefill_tokens=3,
        prefill_kv_tokens=1000.0,
        prefill_sequences=3,
        prefill_chunks=3,
        decode_sequences=2,
        decode_context_tokens=600.0,
    )
    assert mixed.attention_s == pytest.approx(4 * _decode_attention_s(5, 1600.0), rel=1e-12)
    # Two-token chunks are prefills: the prefill kernel prices them.
    longer = cost.step(prefill_tokens=6, prefill_kv_tokens=1000.0, prefill_sequences=3, prefill_chunks=3)
    assert longer.attention_s != pytest.approx(decodes.attention_s, rel=1e-3)


def _decode_attention_s(sequences: int, context_tokens: float) -> float:
    """One DENSE layer's decode attention on one GPU: 128 KV bytes per token-layer, 8 heads of 16."""
    return attention_decode_time_s(
        sequences=sequences,
        context_tokens=context_tokens,
        kv_bytes_per_token=128.0,
        kv_dtype=DType.BF16,
        flops=4.0 * 8 * 16 * context_tokens,
        gpu=GPU,
        calibration=CAL,
    )


def test_overlap_scheduling_hides_cpu_behind_gpu_plus_the_gap() -> None:
    overlapped = replace(ENGINE, overlap_scheduling=True, step_gap_s=3.0e-6)
    step = _cost(DENSE, ParallelLayout(), overlapped).step(decode_sequences=1, decode_context_tokens=10)
    assert step.total_s == pytest.approx(max(step.gpu_s, step.cpu_s) + 3.0e-6, rel=1e-12)


def test_eager_prefill_pays_kernel_launches() -> None:
    cost = _cost(DENSE, ParallelLayout())
    # A prefill step is not graphed: 14 kernels x 4 layers x 5 us of launches, on the CPU and as a GPU floor.
    step = cost.step(prefill_tokens=1, prefill_key_pairs=1, prefill_kv_tokens=1, prefill_sequences=1)
    launch = KERNELS_PER_LAYER * 4 * 5.0e-6
    assert step.cpu_s == pytest.approx(1.0e-4 + 1.0e-6 + launch, rel=1e-12)
    assert step.gpu_s >= launch
    # ... as is a decode batch larger than the largest captured graph.
    big = cost.step(decode_sequences=65, decode_context_tokens=65)
    assert big.cpu_s == pytest.approx(1.0e-4 + 65 * 1.0e-6 + launch, rel=1e-12)


def test_prefill_step_is_the_sum_of_its_parts() -> None:
    cost = _cost(DENSE, ParallelLayout())
    tokens = 300
    pairs = tokens * (tokens + 1) / 2
    step = cost.step(prefill_tokens=tokens, prefill_key_pairs=pairs, prefill_kv_tokens=tokens, prefill_sequences=1)
    # Head dim 16 takes the 192 x 128 tiles; the 4 query heads per KV head share a tile (packed GQA): 2 head units.
    tiles = prefill_chunk_tiles(0.0, float(tokens), rows_per_token=4.0, tile_m=192.0, tile_n=128.0)
    assert cost.chunk_tiles(0, tokens) == tiles
    attention = 4 * attention_prefill_time_s(
        query_tiles=tiles[0],
        key_tiles=tiles[1],
        longest_key_tiles=tiles[2],
        head_units=2.0,
        tile_m=192.0,
        tile_n=128.0,
        head_dim=16.0,
        query_tokens=float(tokens),
        kv_tokens_read=float(tokens),
        heads_per_gpu=8.0,
        kv_heads_per_gpu=2.0,
        kv_bytes_per_element=2.0,
        fp8_kv=False,
        gpu=GPU,
        calibration=CAL,
    )
    gemm = 4 * _dense_layer_gemms(tokens, 1) + _gemm(1, 1000, 64)  # only the finished prompt is sampled
    elementwise = 4 * elementwise_time_s(tokens * (10 * 64 + 3 * 128) * 2.0, 5, gpu=GPU, calibration=CAL)
    assert step.attention_s == pytest.approx(attention, rel=1e-12)
    assert step.gemm_s == pytest.approx(gemm, rel=1e-12)
    # An eager step's GPU time is at least its kernel launches (14 x 4 x 5 us = 280 us).
    assert step.gpu_s == pytest.approx(max(gemm + attention + elementwise, 280e-6), rel=1e-12)
    assert step.total_s == pytest.approx(step.gpu_s + 1.0e-4 + 1.0e-6 + 280e-6, rel=1e-12)


def test_tp2_communication_is_two_all_reduces_per_layer() -> None:
    for tokens in (1, 7, 300):
        one = collective_time_s("all_reduce", tokens * 64 * 2.0, 2, link_bandwidth_bytes_per_s=1.0e11, calibration=CAL)
        # Dense layers: attention output and FFN down-projection each end in an all-reduce.
        dense = _cost(DENSE, make_layout(tp=2)).step(decode_sequences=tokens, decode_context_tokens=tokens)
        assert dense.communication_s == pytest.approx(2 * 4 * one, rel=1e-12)
        # MoE layers without EP or DP: the expert output is reduced like a dense FFN.
        moe = _cost(MOE, make_layout(tp=2)).step(decode_sequences=tokens, decode_context_tokens=tokens)
        assert moe.communication_s == pytest.approx(2 * 4 * one, rel=1e-12)


def test_a_qk_norm_across_heads_adds_one_variance_all_reduce_per_layer() -> None:
    across = replace(DENSE, qk_norm_across_heads=True)
    for tokens in (1, 7, 300):
        one = collective_time_s("all_reduce", tokens * 64 * 2.0, 2, link_bandwidth_bytes_per_s=1.0e11, calibration=CAL)
        # Two fp32 variances (q and k) per token, summed over the TP group in each of the 4 layers.
        variances = collective_time_s("all_reduce", tokens * 8.0, 2, link_bandwidth_bytes_per_s=1.0e11, calibration=CAL)
        step = _cost(across, make_layout(tp=2)).step(decode_sequences=tokens, decode_context_tokens=tokens)
        assert step.communication_s == pytest.approx(2 * 4 * one + 4 * variances, rel=1e-12)
        # Without TP there is nothing to reduce.
        alone = _cost(across, make_layout(tp=1)).step(decode_sequences=tokens, decode_context_tokens=tokens)
        assert alone.communication_s == 0


def test_tp_all_reduce_inside_a_node_runs_the_engines_own_kernel() -> None:
    custom_engine = replace(ENGINE, custom_all_reduce=True)
    for tokens in (1, 7, 300):
        message = tokens * 64 * 2.0
        custom = float(
            custom_all_reduce_times_s(
                np.array(message), np.array(2.0), link_bandwidth_bytes_per_s=1.0e11, calibration=CAL
            )
        )
        nccl = collective_time_s("all_reduce", message, 2, link_bandwidth_bytes_per_s=1.0e11, calibration=CAL)
        assert custom < nccl
        step = _cost(DENSE, make_layout(tp=2), custom_engine).step(
            decode_sequences=tokens, decode_context_tokens=tokens
        )
        assert step.communication_s == pytest.approx(2 * 4 * custom, rel=1e-12)
    # Across nodes (one GPU per node here) the kernel cannot reach its peers: NCCL over the network.
    one_per_node = replace(GPU, gpus_per_node=1)
    cost = step_cost(
        DENSE,
        make_layout(tp=2),
        gpu=one_per_node,
        engine=custom_engine,
        max_tokens=512,
        calibration=CAL,
        moe_calibration=MOE_CAL,
    )
    network = collective_time_s("all_reduce", 7 * 64 * 2.0, 2, link_bandwidth_bytes_per_s=1.0e10, calibration=CAL)
    assert cost.step(decode_sequences=7, decode_context_tokens=7).communication_s == pytest.approx(
        2 * 4 * network, rel=1e-12
    )


def test_tp2_step_splits_the_gemms() -> None:
    step = _cost(DENSE, make_layout(tp=2)).step(decode_sequences=3, decode_context_tokens=30)
    assert step.gemm_s == pytest.approx(4 * _dense_layer_gemms(3, 2) + _gemm(3, 500, 64), rel=1e-12)


def _moe_ffn(m: float, layout: ParallelLayout, routing: str = RANDOM) -> float:
    """Router, shared expert and fused-MoE layer for m tokens per attention-DP rank, from the kernel functions."""
    experts = moe_layer_time_s(
        m * layout.attention_dp,  # every rank's tokens enter every MoE layer
        hidden_size=64,
        expert_width_per_gpu=64 / layout.expert_tp,
        num_experts=16,
        local_experts=16 // layout.moe_ep,
        topk=2,
        weight_dtype=DType.BF16,
        gpu=GPU,
        calibration=MOE_CAL,
        distribution=routing,  # served routing: independent top-k picks unless the deployment says otherwise
    )
    router = _gemm(m, 16, 64)
    shared = _gemm(m, 2 * 64 / layout.tp, 64) + _gemm(m, 64, 64 / layout.tp)
    return float(experts) + router + shared


def _attention_gemms(m: float, tp: int) -> float:
    heads, kv_heads = 8 / tp, max(1.0, 2 / tp)
    return _gemm(m, (heads + 2 * kv_heads) * 16, 64) + _gemm(m, 64, heads * 16)


def _ep_exchange(m: float, layout: ParallelLayout, mode: str) -> float:
    """Dispatch (fp8) + combine (bf16) of one MoE layer, each phase with its own constants; each GPU of a rank
    sends m / tp tokens."""
    return sum(
        float(
            alltoall_time_s(
                m / layout.tp,
                hidden_size=64,
                topk=2,
                ep_ranks=layout.moe_ep,
                bytes_per_element=element_bytes,
                intra_bandwidth_bytes_per_s=1.0e11,
                inter_bandwidth_bytes_per_s=1.0e10,
                ranks_per_domain=8,
                mode=mode,
                calibration=MOE_CAL,
                phase=phase,
            )
        )
        for phase, element_bytes in (("dispatch", 1.0), ("combine", 2.0))
    )


def test_attention_dp_with_ep_adds_all_to_all_and_moe_cost_at_dp_times_tokens() -> None:
    layout = make_layout(tp=2, attention_dp=2, moe_ep=4)
    assert layout.expert_tp == 1
    cost = _cost(MOE, layout)
    n = 5
    step = cost.step(decode_sequences=n, decode_context_tokens=100 * n)
    # 1 dense layer + 3 MoE layers, each with tp=2 attention; the MoE sees dp x 5 = 10 tokens, 4 local experts.
    gemm = (
        _attention_gemms(n, 2)
        + _gemm(n, 2 * 128 / 2, 64)
        + _gemm(n, 64, 128 / 2)
        + 3 * (_attention_gemms(n, 2) + _moe_ffn(n, layout))
        + _gemm(n, 500, 64)
    )
    assert step.gemm_s == pytest.approx(gemm, rel=1e-12)
    reduce = collective_time_s("all_reduce", n * 64 * 2.0, 2, link_bandwidth_bytes_per_s=1.0e11, calibration=CAL)
    # Attention all-reduce in all 4 layers, the dense FFN's in layer 0, then low-latency dispatch + combine per
    # MoE layer (a decode-only step); no MoE all-reduce since each expert is whole (moe_tp = 1).
    comm = 4 * reduce + reduce + 3 * _ep_exchange(n, layout, "low_latency")
    assert step.communication_s == pytest.approx(comm, rel=1e-12)
    # A step carrying prefill tokens switches to the high-throughput (normal) all-to-all kernels.
    mixed = cost.step(prefill_tokens=3, prefill_key_pairs=6, prefill_kv_tokens=3, decode_sequences=2)
    reduce5 = reduce  # 3 prefill + 2 decode tokens = 5 tokens again
    assert mixed.communication_s == pytest.approx(5 * reduce5 + 3 * _ep_exchange(5, layout, "normal"), rel=1e-12)


def _moe_cost(layout: ParallelLayout, **settings: Any) -> ReplicaStepCost:
    """The tiny MoE model's step cost with deployment ``settings`` (routing, backend, expert dtype)."""
    return ReplicaStepCost(
        model=MOE,
        gpu=GPU,
        engine=ENGINE,
        layout=layout,
        weight_dtype=DType.BF16,
        kv_dtype=DType.BF16,
        calibration=CAL,
        max_tokens=512,
        moe_calibration=MOE_CAL,
        **settings,
    )


def test_a_stated_moe_routing_prices_the_layer_at_the_busiest_gpus_load() -> None:
    layout = make_layout(tp=1, attention_dp=4, moe_ep=4)
    n = 200.0
    random_cost = _cost(MOE, layout)
    skewed_cost = _moe_cost(layout, moe_routing="power_law_1.01")
    tokens = np.array([n])
    skewed = float(skewed_cost._moe_ffn_gemms(tokens)[0])
    assert skewed == pytest.approx(_moe_ffn(n, layout, "power_law_1.01"), rel=1e-12)
    assert float(random_cost._moe_ffn_gemms(tokens)[0]) == pytest.approx(_moe_ffn(n, layout), rel=1e-12)
    # 800 tokens x top-2 over 16 experts on 4 GPUs: the GPU holding the hottest expert carries more than its share.
    assert skewed > _moe_ffn(n, layout)


def test_a_forced_moe_backend_picks_the_kernel_every_moe_layer_is_priced_as() -> None:
    layout = make_layout(tp=2)

    def cost(backend: str, moe_dtype: DType) -> ReplicaStepCost:
        return _moe_cost(layout, moe_weight_dtype=moe_dtype, moe_backend=backend)

    # The test GPU has no fp4 tensor cores: MXFP4 experts run vLLM's Triton kernel unless Marlin is forced.
    assert cost("auto", DType.MXFP4).moe_kernel == "mxfp4_bf16"
    marlin = cost("marlin", DType.MXFP4)
    assert marlin.moe_kernel == "w4a16_mxfp4"
    tokens = np.array([40.0])
    experts = moe_layer_time_s(
        tokens,
        hidden_size=64,
        expert_width_per_gpu=32.0,
        num_experts=16,
        local_experts=16,
        topk=2,
        weight_dtype=DType.MXFP4,
        gpu=GPU,
        calibration=MOE_CAL,
        distribution=RANDOM,
        kernel="w4a16_mxfp4",
    )
    shared = _gemm(40, 2 * 64 / 2, 64) + _gemm(40, 64, 64 / 2)
    assert float(marlin._moe_ffn_gemms(tokens)[0]) == pytest.approx(float(experts[0]) + _gemm(40, 16, 64) + shared)
    with pytest.raises(PlanningError, match="not bf16"):
        cost("marlin", DType.BF16)
    assert _cost(DENSE, layout).moe_kernel is None


def test_served_routings_and_backends_are_the_ones_the_plan_spec_accepts() -> None:
    assert get_args(MoeRouting) == SERVED_ROUTINGS
    assert get_args(MoeBackend) == MOE_BACKENDS


def test_moe_tp_under_ep_adds_an_all_reduce_over_the_expert_slices() -> None:
    layout = make_layout(tp=2, attention_dp=2, moe_ep=2)
    assert layout.expert_tp == 2
    n = 4
    step = _cost(MOE, layout).step(decode_sequences=n, decode_context_tokens=40)
    reduce = collective_time_s("all_reduce", n * 64 * 2.0, 2, link_bandwidth_bytes_per_s=1.0e11, calibration=CAL)
    comm = 5 * reduce + 3 * (_ep_exchange(n, layout, "low_latency") + reduce)
    assert step.communication_s == pytest.approx(comm, rel=1e-12)


def test_attention_dp_without_ep_gathers_every_ranks_tokens() -> None:
    layout = make_layout(tp=2, attention_dp=2)
    assert layout.expert_tp == 4
    n = 6
    step = _cost(MOE, layout).step(decode_sequences=n, decode_context_tokens=60)
    reduce = collective_time_s("all_reduce", n * 64 * 2.0, 2, link_bandwidth_bytes_per_s=1.0e11, calibration=CAL)
    # all-gather of both ranks' activations over the 4 GPUs, and the matching reduce-scatter (same cost)
    gather = collective_time_s("all_gather", 2 * n * 64 * 2.0, 4, link_bandwidth_bytes_per_s=1.0e11, calibration=CAL)
    assert step.communication_s == pytest.approx(5 * reduce + 3 * 2 * gather, rel=1e-12)


def test_decode_floor_is_one_token_at_short_context() -> None:
    cost = _cost(DENSE, ParallelLayout())
    assert cost.decode_floor_s() == cost.step(decode_sequences=1, decode_context_tokens=1).total_s
    assert cost.step().total_s == 0


# Layout refusals -----------------------------------------------------------------------------------------


def test_tp_must_divide_the_attention_heads() -> None:
    with pytest.raises(PlanningError, match=r"^tp=3 does not divide the 8 attention heads of tiny-dense; "):
        validate_layout(DENSE, make_layout(tp=3))


def test_tp_must_divide_or_be_a_multiple_of_the_kv_heads() -> None:
    model = replace(DENSE, name="tiny-kv3", num_attention_heads=6, num_kv_heads=3)
    with pytest.raises(PlanningError, match=r"tp=2 neither divides nor is a multiple of the 3 KV heads of tiny-kv3"):
        validate_layout(model, make_layout(tp=2))
    validate_layout(DENSE, make_layout(tp=8))  # 8 is a multiple of the 2 KV heads: replicated, fine


def test_moe_tp_times_moe_ep_must_cover_the_stage() -> None:
    with pytest.raises(
        PlanningError,
        match=r"moe_tp x moe_ep = 1 x 2 must equal tp x attention_dp = 2 x 2 \(the GPUs of one stage\)",
    ):
        validate_layout(MOE, make_layout(tp=2, attention_dp=2, moe_tp=1, moe_ep=2))


def test_moe_ep_must_divide_the_experts() -> None:
    with pytest.raises(PlanningError, match=r"^moe_ep=3 does not divide the 16 experts$"):
        validate_layout(MOE, make_layout(tp=1, attention_dp=3, moe_ep=3))


def test_moe_tp_must_divide_the_expert_width() -> None:
    with pytest.raises(PlanningError, match=r"^moe_tp=3 does not divide the expert width 64$"):
        validate_layout(MOE, make_layout(tp=1, attention_dp=3))


def test_expert_parallelism_needs_an_moe_model() -> None:
    with pytest.raises(PlanningError, match=r"^expert parallelism needs an MoE model; tiny-dense is dense$"):
        validate_layout(DENSE, make_layout(tp=2, moe_ep=2))


def test_pipeline_stages_cannot_exceed_layers_and_degrees_must_be_positive() -> None:
    with pytest.raises(PlanningError, match=r"^pp=5 exceeds the 4 layers of tiny-dense$"):
        validate_layout(DENSE, make_layout(pp=5))
    with pytest.raises(PlanningError, match="parallel degrees must be positive"):
        validate_layout(DENSE, ParallelLayout(tp=0))


def test_refused_layout_refuses_the_step_cost_too() -> None:
    with pytest.raises(PlanningError, match="does not divide the 8 attention heads"):
        _cost(DENSE, make_layout(tp=3))


def test_heads_need_only_divide_by_tp_not_tp_times_dp() -> None:
    # 128 heads over tp=8 x attention_dp=3 = 24 GPUs: 128 is not a multiple of 24, but each rank splits its
    # heads 8 ways, which divides.
    assert MOE.moe is not None
    experts = replace(MOE.moe, num_experts=96, expert_intermediate_size=96)
    big = replace(MOE, name="tiny-128h", num_attention_heads=128, num_kv_heads=8, moe=experts)
    assert 128 % 24 != 0
    validate_layout(replace(DENSE, num_attention_heads=128, num_kv_heads=8), make_layout(tp=8, attention_dp=3))
    for layout in (make_layout(tp=8, attention_dp=3, moe_ep=24), make_layout(tp=8, attention_dp=3, moe_ep=8)):
        validate_layout(big, layout)
        cost = _cost(big, layout)
        assert cost.heads_per_gpu == 16
        assert cost.step(decode_sequences=3, decode_context_tokens=300).total_s > 0
    assert make_layout(tp=8, attention_dp=3, moe_ep=8).expert_tp == 3


# Speculative decoding ------------------------------------------------------------------------------------


def _speculative(acceptance_length: float, engine: EngineSpec = ENGINE) -> ReplicaStepCost:
    plain = _cost(DENSE, make_layout(tp=1), engine)
    return ReplicaStepCost(
        model=plain.model,
        gpu=plain.gpu,
        engine=engine,
        layout=plain.layout,
        weight_dtype=DType.BF16,
        kv_dtype=DType.BF16,
        calibration=CAL,
        max_tokens=512,
        moe_calibration=MOE_CAL,
        speculative=SpeculativeDecoding("eagle", 2, acceptance_length),
    )


def test_a_speculative_decode_step_is_verify_plus_drafts_per_token_gained() -> None:
    plain = _cost(DENSE, make_layout(tp=1))
    drafted = _speculative(1.0)
    one = plain.step(decode_sequences=4, decode_context_tokens=400.0)
    verify = drafted.step(decode_sequences=4, decode_context_tokens=400.0)
    layers = DENSE.num_layers
    lm_head = _gemm(4, DENSE.vocab_size, DENSE.hidden_size)
    # Two draft passes, each one layer like the target's and the LM head over the 4 sequences.
    draft_s = 2 * ((one.gpu_s - lm_head) / layers + lm_head)
    # The verify pass runs 3 tokens per sequence through every GEMM: the target's GEMMs at 12 tokens, the LM head
    # at 12 rows, all summed in gemm_s with the drafts.
    twelve = plain.step(decode_sequences=12, decode_context_tokens=1200.0)
    assert verify.gemm_s == pytest.approx(twelve.gemm_s + draft_s, rel=1e-12)
    # Attention reads each sequence's KV once for its 3 queries: less than 12 sequences reading theirs.
    assert one.attention_s <= verify.attention_s < twelve.attention_s
    # The test engine does not overlap CPU and GPU: the step is their sum.
    assert verify.total_s == pytest.approx(verify.gpu_s + verify.cpu_s, rel=1e-12)
    assert verify.total_s > one.total_s


def test_speculative_steps_are_charged_per_token_gained_only_when_they_only_decode() -> None:
    for acceptance_length in (1.5, 2.0, 3.0):
        drafted = _speculative(acceptance_length)
        per_step = _speculative(1.0)
        decode: dict[str, Any] = {"decode_sequences": 8, "decode_context_tokens": 8_000.0}
        assert drafted.step(**decode).total_s == pytest.approx(per_step.step(**decode).total_s / acceptance_length)
        prefill: dict[str, Any] = {"prefill_tokens": 64, "prefill_sequences": 1, "prefill_kv_tokens": 64.0}
        assert drafted.step(**decode, **prefill).total_s == per_step.step(**decode, **prefill).total_s
        assert drafted.step(**prefill) == _cost(DENSE, make_layout(tp=1)).step(**prefill)


def test_an_engine_that_drops_overlap_with_speculation_adds_cpu_to_gpu() -> None:
    overlapped = replace(ENGINE, overlap_scheduling=True, step_gap_s=1.0e-4)
    kept = _speculative(1.0, overlapped).step(decode_sequences=2, decode_context_tokens=100.0)
    assert kept.total_s == pytest.approx(max(kept.gpu_s, kept.cpu_s) + 1.0e-4, rel=1e-12)
    dropped = _speculative(1.0, replace(overlapped, speculative_overlap=False))
    step = dropped.step(decode_sequences=2, decode_context_tokens=100.0)
    assert step.total_s == pytest.approx(step.gpu_s + step.cpu_s, rel=1e-12)


@pytest.mark.parametrize(
    ("method", "drafts", "accepted", "needle"),
    [
        ("medusa", 2, 2.0, "unknown speculative method"),
        ("mtp", 0, 1.0, "draft tokens must be between 1 and 8"),
        ("mtp", 9, 2.0, "draft tokens must be between 1 and 8"),
        ("mtp", 2, 3.5, "at most draft tokens + 1 = 3"),
        ("mtp", 2, 0.9, "at least 1"),
    ],
)
def test_speculative_settings_no_engine_runs_are_refused(
    method: str, drafts: int, accepted: float, needle: str
) -> None:
    with pytest.raises(PlanningError, match=re.escape(needle)):
        SpeculativeDecoding(method, drafts, accepted).validate()


def test_a_speculative_instance_prices_its_verify_pass_from_its_own_tables(catalog: Catalog) -> None:
    request = EstimateRequest(model="llama-3.1-8b", gpu="h100-sxm", isl=512, osl=64, concurrency=16, max_sequences=16)
    plain = resolve_deployment(replace(request, max_sequences=64), catalog)
    drafted = resolve_deployment(replace(request, speculative=SpeculativeDecoding("eagle", 3, 1.0)), catalog)
    plain_cost = build_instance(plain, plain.layout, Role.DECODE, min_tokens=576).config.cost
    drafted_cost = build_instance(drafted, drafted.layout, Role.DECODE, min_tokens=576).config.cost
    # A decode instance sizes its tables by its batch of sequences; 16 verify 4 tokens each: GEMMs at 64 rows,
    # as a plain step of 64 sequences prices them (not a linear extrapolation past a table sized for 16).
    verify = drafted_cost.step(decode_sequences=16, decode_context_tokens=16 * 600.0, queries=4)
    wide = plain_cost.step(decode_sequences=64, decode_context_tokens=64 * 600.0)
    assert verify.gemm_s == pytest.approx(wide.gemm_s, rel=1e-12)
    assert verify.communication_s == pytest.approx(wide.communication_s, rel=1e-12)
