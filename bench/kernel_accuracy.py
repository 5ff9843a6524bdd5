"""Print the kernel-level error (median / p90 absolute %) of the calibrated roofline on the reference kernels.

Usage: python bench/kernel_accuracy.py [--reference DIR]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from service.catalog.loader import default_catalog
from service.planning.kernel_accuracy import (
    attention_context_errors,
    attention_generation_errors,
    collective_errors,
    gemm_errors,
)


def main() -> None:
    """Evaluate every op kind and print one line each."""
    default = Path(os.environ.get("SPLAN_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reference", type=Path, default=default)
    ref = parser.parse_args().reference

    def load(name: str) -> np.ndarray:
        return np.genfromtxt(ref / name, delimiter=",", names=True, dtype=None, encoding=None)

    catalog = default_catalog()
    gpu = catalog.gpu("h100-sxm")
    cal = catalog.calibration_for(gpu)
    rows = [
        *gemm_errors(load("h100_sxm_gemm.csv"), gpu=gpu, calibration=cal),
        attention_context_errors(load("h100_sxm_attention_context.csv"), gpu=gpu, calibration=cal),
        attention_generation_errors(load("h100_sxm_attention_generation.csv"), gpu=gpu, calibration=cal),
        *collective_errors(load("h100_sxm_nccl.csv"), gpu=gpu, calibration=cal),
    ]
    print(f"{'op kind':20s} {'rows':>6s} {'median':>8s} {'p90':>8s}")
    for s in rows:
        print(f"{s.kind:20s} {s.rows:6d} {s.median_pct:7.1f}% {s.p90_pct:7.1f}%")


if __name__ == "__main__":
    main()
