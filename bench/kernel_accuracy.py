"""Print the kernel-level error (median / p90 absolute %) of the calibrated roofline on the reference kernels.

Usage: python bench/kernel_accuracy.py [--reference DIR]

For each GPU with reference tables (h100-sxm, b200) and each op kind: rows, then median / p90 absolute % error
with the catalog calibration (calibration.yaml, as fitted by bench/calibrate.py), on the shapes the fit held out,
and with the other GPU's calibration transferred (its constants, this GPU's datasheet peaks). MoE layer per expert
kernel (moe_<kernel>), DeepEP all-to-all per backend and phase and the MLA block use moe_calibration.yaml; a
transferred MoE kernel the other GPU never ran uses that GPU's bf16 constants (the planner's fallback too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.calibrate import GPUS, default_reference_dir, load_tables
from service.catalog.loader import default_catalog
from service.planning.calibration_fit import holdout_mask
from service.planning.kernel_accuracy import PREDICTORS, ErrorSummary, kernel_errors, measured_s, moe_kernel_errors
from service.planning.kernels import dispatch_kernels, dispatch_key
from service.planning.specs import DType


def _cell(s: ErrorSummary | None) -> str:
    return "–" if s is None else f"{s.median_pct:6.1f}% {s.p90_pct:6.1f}%"


def main() -> None:
    """Evaluate every op kind on every GPU and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=default_reference_dir())
    ref = parser.parse_args().reference
    catalog = default_catalog()
    header = f"{'gpu':9s} {'op kind':28s} {'rows':>6s} {'median':>7s} {'p90':>7s}"
    print(f"{header} {'held-out med':>12s} {'p90':>7s} {'transf. med':>11s} {'p90':>7s}  transferred from")
    for gpu_name, prefix in GPUS.items():
        tables = load_tables(ref, prefix)
        if not tables:
            continue
        other = next(g for g in GPUS if g != gpu_name)
        gpu = catalog.gpu(gpu_name)
        own = catalog.calibration_for(gpu)
        moved = catalog.calibration_for(catalog.gpu(other))
        masks = {t: holdout_mask(t, rows, architecture=gpu.architecture) for t, rows in tables.items()}
        held = {s.kind: s for s in kernel_errors(tables, gpu=gpu, calibration=own, masks=masks)}
        transferred = {s.kind: s for s in kernel_errors(tables, gpu=gpu, calibration=moved)}
        rows = kernel_errors(tables, gpu=gpu, calibration=own)
        # MoE layer, DeepEP all-to-all and MLA: moe_calibration.yaml (bench/calibrate.py fits it too).
        own_moe = catalog.moe_calibration_for(gpu)
        moved_moe = catalog.moe_calibration_for(catalog.gpu(other))
        held.update({s.kind: s for s in moe_kernel_errors(tables, gpu=gpu, calibration=own_moe, masks=masks)})
        transferred.update({s.kind: s for s in moe_kernel_errors(tables, gpu=gpu, calibration=moved_moe)})
        rows += moe_kernel_errors(tables, gpu=gpu, calibration=own_moe)
        for s in rows:
            print(
                f"{gpu_name:9s} {s.kind:28s} {s.rows:6d} {s.median_pct:6.1f}% {s.p90_pct:6.1f}% "
                f"{_cell(held.get(s.kind)):>20s} {_cell(transferred.get(s.kind)):>19s}  {other}"
            )
    print(f"\n{'gpu':9s} {'scaled GEMM kernel (gemm_dispatch.yaml)':52s} {'rows':>6s} {'median':>7s} {'p90':>7s}")
    for gpu_name, prefix in GPUS.items():
        gemm = load_tables(ref, prefix).get("gemm")
        if gemm is None:
            continue
        gpu = catalog.gpu(gpu_name)
        own = catalog.calibration_for(gpu)
        for table_dtype, dtype in (("fp8", DType.FP8), ("nvfp4", DType.FP4)):
            rules = own.gemm_dispatch.get(dispatch_key(gpu.architecture, dtype), ())
            part = gemm[gemm["dtype"] == table_dtype]
            if not rules or part.size == 0:
                continue
            error_pct = np.abs(PREDICTORS["gemm"](part, gpu=gpu, calibration=own) / measured_s(part) - 1.0) * 100.0
            kernels, chosen = dispatch_kernels(rules, *(part[c].astype(np.float64) for c in ("m", "n", "k")))
            for index in sorted(set(chosen.tolist())):
                sel = error_pct[chosen == index]
                rule = rules[index]
                label = f"{kernels[index]} ({rule.tile_m:.0f}x{rule.tile_n:.0f}, m<={rule.m_max:g}, n<={rule.n_max:g})"
                print(f"{gpu_name:9s} {label:52s} {sel.size:6d} {np.median(sel):6.1f}% {np.percentile(sel, 90):6.1f}%")


if __name__ == "__main__":
    main()
