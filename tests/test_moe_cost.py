"""MoE layer and expert-parallel all-to-all cost: hand-computed values and properties."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.planning.mla_cost import MlaCalibration, mla_decode_time_s, mla_prefill_time_s
from service.planning.moe_cost import (
    MARLIN_KERNELS,
    MoeCalibration,
    alltoall_time_s,
    expected_touched_experts,
    expert_kernel,
    marlin_block_tokens,
    moe_layer_time_s,
    moe_routing_summary,
    padded_expert_shape,
)
from service.planning.specs import DType, GpuSpec
from tests.specs_for_tests import gpu_spec


def _gpu() -> GpuSpec:
    return gpu_spec(
        hbm_bandwidth_bytes_per_s=2.0e12,
        intra_node_bandwidth_bytes_per_s=400e9,
        inter_node_bandwidth_bytes_per_s=50e9,
    )


def test_touched_experts_exact() -> None:
    # 1 token x top-8 of 256 experts, EP 8 (32 local): 8 x 32 / 256 = exactly 1 local expert.
    one = expected_touched_experts(1.0, num_experts=256, topk=8, local_experts=32)
    assert float(one) == pytest.approx(1.0, rel=1e-12)
    # 4 tokens: 32 routed slots spread evenly -> 4 local experts; 10000 tokens: all 32.
    assert float(expected_touched_experts(4.0, num_experts=256, topk=8, local_experts=32)) == pytest.approx(4.0)
    assert float(expected_touched_experts(10000.0, num_experts=256, topk=8, local_experts=32)) == 32.0
    # Skewed routing: the busiest GPU still holds at most its local experts, and touches more at small counts.
    skew = expected_touched_experts(
        np.array([1.0, 4.0, 1e5]), num_experts=256, topk=8, local_experts=32, distribution="power_law_1.2"
    )
    assert skew[-1] == pytest.approx(32.0)
    assert np.all(skew <= 32.0 + 1e-9)


def test_moe_layer_time_exact() -> None:
    gpu = _gpu()
    c = MoeCalibration(
        compute_efficiency={"bf16": 0.5},
        bandwidth_efficiency={"bf16": 0.8},
        tile_tokens=16.0,
        fixed_s=1e-5,
        per_pair_s=1e-9,
        routed_activation_passes=2.0,
        blend_power=4.0,
    )
    # 4 tokens x top-2 of 8 experts, EP 2 (4 local): 1 token per expert, all 4 local experts touched, 4 M tiles.
    tokens, hidden, width = 4.0, 256, 128
    # up GEMM: 4 tiles x ceil(2 x 128 / 128) = 8 CTAs, down: 4 x ceil(256 / 128) = 8 CTAs: one wave of 100 SMs each.
    wave_up = 100 * 2 * 16 * 128 * 256
    wave_down = 100 * 2 * 16 * 128 * 128
    t_compute = (wave_up + wave_down) / (1e15 * 0.5)
    weights = 4 * 3 * 256 * 128 * 2
    acts = 4 * (2 * 256 + 3 * 128) * 2 + 4 * 256 * 4
    t_memory = (weights + acts) / (2e12 * 0.8)
    roof = (t_compute**4 + t_memory**4) ** 0.25
    overhead = 1e-5 + 1e-9 * 4 + 2.0 * 4 * 2 * 256 * 2 / 2e12
    layer: dict[str, Any] = {
        "hidden_size": hidden,
        "expert_width_per_gpu": width,
        "num_experts": 8,
        "local_experts": 4,
        "topk": 2,
        "weight_dtype": DType.BF16,
        "gpu": gpu,
        "calibration": c,
    }
    got = moe_layer_time_s(tokens, **layer)
    assert float(got) == pytest.approx(roof + overhead, rel=1e-12)
    assert float(moe_layer_time_s(0.0, **layer)) == 0.0


def test_alltoall_exact() -> None:
    c = MoeCalibration(
        alltoall_latency_s={"low_latency": 2e-5, "normal": 5e-5},
        alltoall_bandwidth_efficiency={"low_latency": 0.5, "normal": 0.4},
        alltoall_per_token_s={"normal": 1e-8},
    )
    common = {
        "hidden_size": 1024,
        "topk": 2,
        "ep_ranks": 4,
        "bytes_per_element": 2.0,
        "intra_bandwidth_bytes_per_s": 400e9,
        "inter_bandwidth_bytes_per_s": 50e9,
        "ranks_per_domain": 8,
        "calibration": c,
    }
    # Low latency: one copy per selected expert, 3 of 4 ranks remote -> 100 x 1024 x 2 x 2 x 3/4 bytes on NVLink.
    ll = alltoall_time_s(100.0, mode="low_latency", **common)  # type: ignore[arg-type]
    assert float(ll) == pytest.approx(2e-5 + 100 * 1024 * 2 * 2 * 0.75 / (400e9 * 0.5), rel=1e-12)
    # Normal: once per destination rank, 4 x (1 - (3/4)^2) = 1.75 ranks, 3/4 of them remote.
    ht = alltoall_time_s(100.0, mode="normal", **common)  # type: ignore[arg-type]
    expected = 5e-5 + 1e-8 * 100 + 100 * 1024 * 2 * 1.75 * 0.75 / (400e9 * 0.4)
    assert float(ht) == pytest.approx(expected, rel=1e-12)
    one_rank = {**common, "ep_ranks": 1}
    assert float(alltoall_time_s(100.0, mode="normal", **one_rank)) == 0.0  # type: ignore[arg-type]


SHAPES = st.sampled_from([(2048, 768, 8, 128), (7168, 2048, 8, 256), (4096, 14336, 2, 8), (2880, 2880, 4, 32)])


@settings(max_examples=40, deadline=None)
@given(
    shape=SHAPES,
    ep_log2=st.integers(0, 3),
    dtype=st.sampled_from([DType.BF16, DType.FP8, DType.FP4]),
    dist=st.sampled_from(["balanced", "power_law_1.01", "power_law_1.2"]),
)
def test_monotone_in_tokens(shape: tuple[int, int, int, int], ep_log2: int, dtype: DType, dist: str) -> None:
    from service.catalog.loader import default_catalog

    catalog = default_catalog()
    gpu = catalog.gpu("h100-sxm")
    hidden, width, topk, experts = shape
    ep = min(2**ep_log2, experts)
    m = np.arange(0, 3000, dtype=np.float64)
    t = moe_layer_time_s(
        m,
        hidden_size=hidden,
        expert_width_per_gpu=width,
        num_experts=experts,
        local_experts=experts // ep,
        topk=topk,
        weight_dtype=dtype,
        gpu=gpu,
        calibration=catalog.moe_calibration_for(gpu),
        distribution=dist,
    )
    # Marlin (fp4 experts on H100) picks a larger M block as tokens grow; where the heaviest experts' loads then
    # fit one block instead of two, the layer gets cheaper by up to 1.1% (Mixtral's shape, EP 2, power law 1.01,
    # 58 tokens: the worst over these shapes, EP 1-8 and distributions up to 5,000 tokens). The others never.
    marlin = expert_kernel(dtype, gpu) in MARLIN_KERNELS
    assert np.all(np.diff(t) >= -(0.02 if marlin else 1e-12) * t[1:])


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.floats(0.0, 1e5),
    experts_log2=st.integers(3, 9),
    topk=st.integers(1, 8),
    ep_log2=st.integers(0, 6),
    dist=st.sampled_from(["balanced", "power_law_1.01", "power_law_1.2"]),
)
def test_touched_within_local_and_weights_shrink_with_ep(
    tokens: float, experts_log2: int, topk: int, ep_log2: int, dist: str
) -> None:
    experts = 2**experts_log2
    ep = min(2**ep_log2, experts)
    topk = min(topk, experts)
    r = moe_routing_summary(
        tokens, num_experts=experts, local_experts=experts // ep, topk=topk, tile_tokens=64.0, distribution=dist
    )
    assert 0.0 <= float(r.touched) <= experts // ep + 1e-9
    assert float(r.pairs) <= tokens * topk * (1 + 1e-9)
    # Per-GPU weight bytes follow the touched experts: more EP ranks never touch more experts per GPU.
    if ep < experts:
        wider = moe_routing_summary(
            tokens,
            num_experts=experts,
            local_experts=experts // (2 * ep),
            topk=topk,
            tile_tokens=64.0,
            distribution=dist,
        )
        assert float(wider.touched) <= float(r.touched) + 1e-9


def test_mla_time_grows_with_work() -> None:
    from service.catalog.loader import default_catalog

    catalog = default_catalog()
    gpu = catalog.gpu("h100-sxm")
    mla = MlaCalibration().with_overrides(catalog.moe_calibration_for(gpu).mla)
    dec = mla_decode_time_s(
        np.array([1.0, 8.0, 64.0]),
        4096.0,
        heads_per_gpu=16,
        kv_dtype="fp8",
        gemm_dtype="fp8_block",
        gpu=gpu,
        calibration=mla,
    )
    assert np.all(np.diff(dec) > 0)
    pre = mla_prefill_time_s(
        1.0,
        np.array([128.0, 1024.0, 8192.0]),
        heads_per_gpu=16,
        kv_dtype="bf16",
        gemm_dtype="bf16",
        gpu=gpu,
        calibration=mla,
    )
    assert np.all(np.diff(pre) > 0)


def test_marlin_picks_its_m_block_per_call_as_vllm_does() -> None:
    # vLLM fused_marlin_moe: the first of 8, 16, 32, 48, 64 with tokens x top-k / experts / block < 0.9, else 64.
    # Kimi-K2's 384 experts, top-8: 6.67 tokens per expert at 320 tokens (block 8), 8 at 384 (8 / 8 = 1: block 16),
    # 32 at 1,536 (block 48), 42.7 at 2,048 (block 48), 64 at 3,072 (block 64).
    tokens = np.array([1.0, 320.0, 384.0, 768.0, 1536.0, 2048.0, 3072.0, 16384.0])
    blocks = marlin_block_tokens(tokens, topk=8, local_experts=384.0)
    assert blocks.tolist() == [8.0, 8.0, 16.0, 32.0, 48.0, 48.0, 64.0, 64.0]


def test_a_marlin_layer_steps_with_its_block() -> None:
    # Compute-bound on one SM (waves = CTAs) with no memory or fixed costs: the layer time is the padded rows.
    # 320 -> 384 tokens doubles the block (8 -> 16) at one M tile per expert: twice the time for 20% more tokens.
    # 3,072 -> 4,096 tokens keeps block 64 and goes from one tile per expert (64 tokens) to two (85.3): twice again.
    gpu = gpu_spec(num_sms=1, hbm_bandwidth_bytes_per_s=1.0e30)
    calibration = MoeCalibration(
        compute_efficiency={"bf16": 1.0, "int4_wo": 1.0},
        bandwidth_efficiency={"bf16": 1.0, "int4_wo": 1.0},
        fixed_s=0.0,
        per_pair_s=0.0,
        routed_activation_passes=0.0,
    )

    def layer_s(tokens: float) -> float:
        return float(
            moe_layer_time_s(
                tokens,
                hidden_size=7168,
                expert_width_per_gpu=2048,
                num_experts=384,
                local_experts=384,
                topk=8,
                weight_dtype=DType.INT4,
                gpu=gpu,
                calibration=calibration,
                kernel="int4_wo",
            )
        )

    # One tile of 8 rows per expert: 384 x (2 x 2048 / 128 up CTAs x 2 x 8 x 128 x 7168 + 7168 / 128 down CTAs x
    # 2 x 8 x 128 x 2048) FLOPs at 1 PFLOP/s.
    assert layer_s(320.0) == pytest.approx(384 * (32 * 2 * 8 * 128 * 7168 + 56 * 2 * 8 * 128 * 2048) / 1e15, rel=1e-9)
    assert layer_s(384.0) == pytest.approx(2.0 * layer_s(320.0), rel=1e-9)
    assert layer_s(4096.0) == pytest.approx(2.0 * layer_s(3072.0), rel=1e-9)


def test_flashinfer_mxfp4_experts_on_blackwell_run_padded_to_256() -> None:
    # vLLM pads each expert to multiples of 256 for FlashInfer's TRT-LLM MXFP4 kernels on Blackwell: a 3072-wide
    # expert split 32 ways (96 columns) with hidden 2880 runs as 256 x 3072, the same layer as one given that shape.
    assert padded_expert_shape("w4a8_mxfp4_mxfp8", "blackwell", 2880.0, 96.0) == (3072.0, 256.0)
    assert padded_expert_shape("mxfp4_bf16", "blackwell", 3072.0, 1536.0) == (3072.0, 1536.0)
    assert padded_expert_shape("mxfp4_bf16", "hopper", 2880.0, 96.0) == (2880.0, 96.0)
    assert padded_expert_shape("nvfp4", "blackwell", 2880.0, 96.0) == (2880.0, 96.0)
    peaks = {DType.BF16: 1.0e15, DType.FP8: 2.0e15, DType.FP4: 4.0e15, DType.MXFP4: 4.0e15}
    calibration = MoeCalibration()

    def layer_s(architecture: str, hidden: int, width: float) -> float:
        return float(
            moe_layer_time_s(
                512.0,
                hidden_size=hidden,
                expert_width_per_gpu=width,
                num_experts=128,
                local_experts=128,
                topk=4,
                weight_dtype=DType.MXFP4,
                gpu=gpu_spec(architecture=architecture, peak_flops_per_s=peaks),
                calibration=calibration,
                kernel="w4a8_mxfp4_mxfp8",
            )
        )

    assert layer_s("blackwell", 2880, 96.0) == layer_s("blackwell", 3072, 256.0)
    assert layer_s("hopper", 2880, 96.0) < layer_s("hopper", 3072, 256.0)
