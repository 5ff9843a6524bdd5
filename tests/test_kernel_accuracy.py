"""Kernel-level error of the calibrated roofline on the measured H100 kernels (bounds reached, asserted)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.planning.catalog import Catalog
from service.planning.kernel_accuracy import (
    attention_context_errors,
    attention_generation_errors,
    collective_errors,
    gemm_errors,
)

# Median / p90 absolute % error reached on ../shared/reference (see bench/RESULTS.md).
BOUNDS = {
    "gemm_bf16": (10.0, 28.0),
    "gemm_fp8": (19.0, 38.0),
    "attention_prefill": (14.0, 40.0),
    "attention_decode": (12.0, 37.0),
    "all_reduce": (17.0, 37.0),
    "all_gather": (21.0, 41.0),
    "reduce_scatter": (23.0, 43.0),
    "alltoall": (26.0, 53.0),
}


def _load(path: Path) -> np.ndarray:
    return np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding=None)


def test_kernel_errors_within_bounds(catalog: Catalog, reference_dir: Path) -> None:
    gpu = catalog.gpu("h100-sxm")
    cal = catalog.calibration_for(gpu)
    summaries = [
        *gemm_errors(_load(reference_dir / "h100_sxm_gemm.csv"), gpu=gpu, calibration=cal),
        attention_context_errors(_load(reference_dir / "h100_sxm_attention_context.csv"), gpu=gpu, calibration=cal),
        attention_generation_errors(
            _load(reference_dir / "h100_sxm_attention_generation.csv"), gpu=gpu, calibration=cal
        ),
        *collective_errors(_load(reference_dir / "h100_sxm_nccl.csv"), gpu=gpu, calibration=cal),
    ]
    assert {s.kind for s in summaries} == set(BOUNDS)
    for s in summaries:
        median_bound, p90_bound = BOUNDS[s.kind]
        assert s.median_pct <= median_bound, s
        assert s.p90_pct <= p90_bound, s


@pytest.mark.parametrize("m", [1, 64, 4096])
def test_gemm_time_grows_with_work(catalog: Catalog, m: int) -> None:
    from service.planning.kernels import gemm_time_s
    from service.planning.specs import DType

    gpu = catalog.gpu("h100-sxm")
    cal = catalog.calibration_for(gpu)
    small = float(gemm_time_s(m, 4096, 4096, gpu=gpu, weight_dtype=DType.BF16, calibration=cal))
    large = float(gemm_time_s(m, 8192, 8192, gpu=gpu, weight_dtype=DType.BF16, calibration=cal))
    assert large > small > 0
