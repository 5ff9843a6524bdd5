"""MoE routing and kernel choice, hand-checked: balanced shares, expert kernels per dtype, GPU and backend,
the expert-parallel fixed cost, one-rank EP."""

from __future__ import annotations

import numpy as np
import pytest

from service.planning.catalog import Catalog
from service.planning.moe_cost import (
    MoeCalibration,
    alltoall_copies_per_token,
    expected_destination_ranks,
    expert_kernel,
    local_pair_share,
    moe_layer_time_s,
    routing_probabilities,
)
from service.planning.specs import DType, PlanningError


def test_balanced_routing_gives_every_expert_the_same_share() -> None:
    assert routing_probabilities(8).tolist() == [0.125] * 8
    # 8 of 256 experts per token, 32 of them on the GPU: 8 x 32 / 256 = 1 pair per token.
    assert local_pair_share(256, 32, 8) == 1.0
    assert local_pair_share(256, 32, 8, "random") == 1.0


def test_skewed_routing_favours_the_first_experts_and_loads_the_busiest_gpu_more() -> None:
    shares = routing_probabilities(16, "power_law_1.2")
    assert float(shares.sum()) == pytest.approx(1.0)
    assert shares[0] > 1.0 / 16 > shares[-1]
    # The busiest GPU holds more than its even share (8 x 32 / 256 = 1 pair per token), at most all 8.
    assert 1.0 < local_pair_share(256, 32, 8, "power_law_1.2") <= 8.0


def test_an_unknown_distribution_or_calibration_field_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown routing distribution 'zipf'"):
        routing_probabilities(8, "zipf")
    with pytest.raises(ValueError, match="unknown MoE calibration field 'speed'"):
        MoeCalibration().with_overrides({"speed": 1.0})


@pytest.mark.parametrize(
    ("gpu", "dtype", "backend", "kernel"),
    [
        ("h100-sxm", DType.BF16, "auto", "bf16"),
        ("h100-sxm", DType.FP8, "auto", "fp8_block"),
        ("h100-sxm", DType.FP4, "auto", "w4a16_mxfp4"),
        ("h100-sxm", DType.MXFP4, "auto", "mxfp4_bf16"),
        ("h100-sxm", DType.INT4, "auto", "int4_wo"),
        ("b200", DType.FP4, "auto", "nvfp4"),
        ("b200", DType.MXFP4, "auto", "w4a8_mxfp4_mxfp8"),
        # The Marlin backend runs 4-bit experts weight-only, on any GPU.
        ("h100-sxm", DType.MXFP4, "marlin", "w4a16_mxfp4"),
        ("h100-sxm", DType.FP4, "marlin", "w4a16_mxfp4"),
        ("h100-sxm", DType.INT4, "marlin", "int4_wo"),
        ("b200", DType.MXFP4, "marlin", "w4a16_mxfp4"),
        # FlashInfer's CUTLASS fused MoE, where Blackwell's default is its TRT-LLM kernels.
        ("b200", DType.BF16, "flashinfer_cutlass", "bf16_cutlass"),
        ("b200", DType.FP4, "flashinfer_cutlass", "nvfp4_cutlass"),
    ],
)
def test_expert_kernels_follow_the_dtype_what_the_gpu_runs_and_the_backend(
    catalog: Catalog, gpu: str, dtype: DType, backend: str, kernel: str
) -> None:
    assert expert_kernel(dtype, catalog.gpu(gpu), backend) == kernel


def test_a_backend_that_cannot_run_the_experts_is_refused(catalog: Catalog) -> None:
    gpu = catalog.gpu("h100-sxm")
    with pytest.raises(PlanningError, match=r"runs 4-bit weight-only experts \(mxfp4, fp4, int4\), not fp8"):
        expert_kernel(DType.FP8, gpu, "marlin")
    with pytest.raises(PlanningError, match="unknown MoE backend 'cutlass'; use one of auto, marlin"):
        expert_kernel(DType.MXFP4, gpu, "cutlass")
    # The CUTLASS backend is priced where the B200 table timed it: bf16 and fp4 experts on Blackwell.
    with pytest.raises(PlanningError, match=r"not bf16 experts on h100-sxm \(hopper\); use auto"):
        expert_kernel(DType.BF16, gpu, "flashinfer_cutlass")
    with pytest.raises(PlanningError, match=r"not fp8 experts on b200 \(blackwell\); use auto"):
        expert_kernel(DType.FP8, catalog.gpu("b200"), "flashinfer_cutlass")


def test_an_expert_parallel_layer_pays_its_kernels_extra_fixed_cost(catalog: Catalog) -> None:
    gpu = catalog.gpu("h100-sxm")
    plain = MoeCalibration()
    with_ep = MoeCalibration(kernel_ep_fixed_s={"bf16": 2.5e-5})

    def layer_s(cal: MoeCalibration, local_experts: int) -> float:
        return float(
            moe_layer_time_s(
                64.0,
                hidden_size=2048,
                expert_width_per_gpu=768.0,
                num_experts=128,
                local_experts=local_experts,
                topk=8,
                weight_dtype=DType.BF16,
                gpu=gpu,
                calibration=cal,
            )
        )

    # Split over 8 GPUs (16 local experts): exactly 25 us more; whole (128 local): unchanged.
    assert layer_s(with_ep, 16) - layer_s(plain, 16) == pytest.approx(2.5e-5, rel=1e-9)
    assert layer_s(with_ep, 128) == layer_s(plain, 128)


def test_one_expert_parallel_rank_sends_nothing() -> None:
    assert expected_destination_ranks(8, 1) == 0.0
    assert alltoall_copies_per_token(8, 1, "normal") == 0.0
    assert alltoall_copies_per_token(8, 1, "low_latency") == 0.0
    # Two ranks, top-2: 2 x (1 - (1/2)^2) = 1.5 distinct ranks per token.
    assert expected_destination_ranks(2, 2) == 1.5
    assert np.isclose(alltoall_copies_per_token(2, 2, "low_latency"), 1.0)
