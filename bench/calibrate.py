"""Fit every kernel calibration constant from the reference CSVs and write service/catalog/data/calibration.yaml.

Usage: python bench/calibrate.py [--reference DIR] [--dry-run]

Each GPU is fitted on its own tables (h100-sxm from h100_sxm_*.csv, b200 from b200_sxm_*.csv) with 20% of the
shapes held out (CRC32 of the shape, see service/planning/calibration_fit.py); the table printed gives, per GPU and
op kind, the error on the held-out shapes and on all rows with its own fit, and on all rows with the other GPU's
fit transferred (that GPU's constants, this GPU's datasheet peaks).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from service.catalog.loader import DATA_DIR, load_catalog, parse_yaml
from service.planning.calibration_fit import fit_all, fit_all_moe, holdout_mask
from service.planning.kernel_accuracy import MOE_TABLES, TABLES, ErrorSummary, kernel_errors, moe_kernel_errors
from service.planning.kernels import KernelCalibration
from service.planning.moe_cost import MoeCalibration
from service.planning.moe_fit import calibration_values

# Catalog GPU name -> reference file prefix.
GPUS = {"h100-sxm": "h100_sxm", "b200": "b200_sxm"}
# Date written into the header (fixed so that reruns give the same file; pass --date to change it).
DEFAULT_DATE = "2026-11-30"


def default_reference_dir() -> Path:
    """$SPLAN_REFERENCE_DIR, else ../shared/reference next to the repository."""
    return Path(os.environ.get("SPLAN_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"))


def load_tables(reference: Path, prefix: str) -> dict[str, np.ndarray]:
    """Every kernel table present for one GPU, as numpy structured arrays."""
    out = {}
    for table in TABLES + MOE_TABLES:
        path = reference / f"{prefix}_{table}.csv"
        if path.exists():
            out[table] = np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding=None)
    return out


def _by_kind(summaries: list[ErrorSummary]) -> dict[str, ErrorSummary]:
    return {s.kind: s for s in summaries}


def _cell(s: ErrorSummary | None) -> str:
    return "–" if s is None else f"{s.median_pct:5.1f} / {s.p90_pct:5.1f}"


def main() -> None:
    """Fit, print the error table and write calibration.yaml (read-modify-write)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=default_reference_dir())
    parser.add_argument("--out", type=Path, default=DATA_DIR / "calibration.yaml")
    parser.add_argument("--moe-out", type=Path, default=DATA_DIR / "moe_calibration.yaml")
    parser.add_argument("--date", default=DEFAULT_DATE)
    parser.add_argument("--dry-run", action="store_true", help="fit and print, write nothing")
    args = parser.parse_args()
    catalog = load_catalog()
    base = KernelCalibration(gemm_dispatch=catalog.calibration.gemm_dispatch)
    tables = {gpu: load_tables(args.reference, prefix) for gpu, prefix in GPUS.items()}
    fitted = {gpu: fit_all(tables[gpu], catalog.gpu(gpu), base) for gpu in GPUS}

    print(
        f"{'gpu':9s} {'op kind':26s} {'rows':>6s} {'held-out (own)':>16s} {'all (own)':>16s} {'all (transferred)':>18s}"
    )
    for gpu in GPUS:
        other = next(g for g in GPUS if g != gpu)
        spec = catalog.gpu(gpu)
        own = base.with_overrides(fitted[gpu])
        transferred = base.with_overrides(fitted[other])
        masks = {t: holdout_mask(t, rows, architecture=spec.architecture) for t, rows in tables[gpu].items()}
        held = _by_kind(kernel_errors(tables[gpu], gpu=spec, calibration=own, masks=masks))
        every = kernel_errors(tables[gpu], gpu=spec, calibration=own)
        moved = _by_kind(kernel_errors(tables[gpu], gpu=spec, calibration=transferred))
        for s in every:
            print(
                f"{gpu:9s} {s.kind:26s} {s.rows:6d} {_cell(held.get(s.kind)):>16s} {_cell(s):>16s} "
                f"{_cell(moved.get(s.kind)):>18s}   (from {other})"
            )
    moe_fitted = {gpu: fit_all_moe(tables[gpu], catalog.gpu(gpu), MoeCalibration()) for gpu in GPUS}
    for gpu in GPUS:
        other = next(g for g in GPUS if g != gpu)
        spec = catalog.gpu(gpu)
        own_moe = moe_fitted[gpu][0]
        masks = {t: holdout_mask(t, rows, architecture=spec.architecture) for t, rows in tables[gpu].items()}
        held = _by_kind(moe_kernel_errors(tables[gpu], gpu=spec, calibration=own_moe, masks=masks))
        moved = _by_kind(moe_kernel_errors(tables[gpu], gpu=spec, calibration=moe_fitted[other][0]))
        other_kernels = set(moe_fitted[other][0].kernel_fixed_s)
        for s in moe_kernel_errors(tables[gpu], gpu=spec, calibration=own_moe):
            # Transferred only where the other GPU fitted that kernel (or the op at all).
            shared = not s.kind.startswith("moe_") or s.kind.removeprefix("moe_") in other_kernels
            fitted_there = s.kind.split("_")[0] in {f.split("_")[0] for f in moe_fitted[other][1]}
            cell = _cell(moved.get(s.kind)) if shared and fitted_there else "–"
            print(
                f"{gpu:9s} {s.kind:26s} {s.rows:6d} {_cell(held.get(s.kind)):>16s} {_cell(s):>16s} "
                f"{cell:>18s}   (from {other})"
            )
    if args.dry_run:
        return
    write_moe_calibration(args.moe_out, moe_fitted, args.date)
    existing: dict[str, Any] = {}
    if args.out.exists():
        existing = parse_yaml(args.out.read_text(encoding="utf-8")) or {}
    sections: dict[str, dict[str, Any]] = {name: dict(values or {}) for name, values in existing.items()}
    # Other GPUs inherit the H100 fit, plus the Blackwell-only kernels (fp4, block-scaled fp8) from the B200 fit.
    default = dict(sections.get("default", {}))
    for source in ("b200", "h100-sxm"):
        for key, value in fitted[source].items():
            if isinstance(value, dict) and isinstance(default.get(key), dict):
                default[key] = {**default[key], **value}
            else:
                default[key] = value
    sections["default"] = default
    for gpu in GPUS:
        sections[gpu] = {**sections.get(gpu, {}), **fitted[gpu]}
    header = (
        f"# Kernel calibration, generated by `python bench/calibrate.py` on {args.date} from the kernel tables in\n"
        "# ../shared/reference (h100-sxm from h100_sxm_*.csv, b200 from b200_sxm_*.csv; 20% of shapes held out by\n"
        "# CRC32 of the shape, see service/planning/calibration_fit.py). `default` applies to every GPU (datasheet\n"
        "# peaks x these efficiencies): the H100 fit plus the B200-only kernels; a key named after a GPU overrides\n"
        "# fields for that GPU only. Keys the script does not fit are kept. Do not edit fitted values by hand.\n"
    )
    body = yaml.safe_dump(_rounded(sections), sort_keys=True, default_flow_style=False)
    args.out.write_text(header + body, encoding="utf-8")
    print(f"wrote {args.out}")


def write_moe_calibration(path: Path, fitted: dict[str, tuple[MoeCalibration, list[str]]], date: str) -> None:
    """moe_calibration.yaml: `default` is the H100 fit plus the kernels only the B200 has; one section per GPU
    with only what was fitted on that GPU's tables (the rest comes from `default`)."""
    values: dict[str, dict[str, Any]] = {}
    for gpu, (cal, ran) in fitted.items():
        section = calibration_values(cal)
        if "moe_alltoall" not in ran:
            section = {k: v for k, v in section.items() if not k.startswith("alltoall_")}
        if "mla" in ran:
            section["mla"] = dict(cal.mla)
        values[gpu] = section
    default: dict[str, Any] = {}
    for source in ("b200", "h100-sxm"):
        for key, value in values[source].items():
            if isinstance(value, dict) and isinstance(default.get(key), dict):
                default[key] = {**default[key], **value}
            else:
                default[key] = value
    header = (
        f"# MoE-layer, DeepEP all-to-all and MLA calibration, generated by `python bench/calibrate.py` on {date}\n"
        "# from the kernel tables in ../shared/reference: h100-sxm from h100_sxm_moe.csv, h100_sxm_moe_alltoall.csv\n"
        "# and h100_sxm_mla_*.csv; b200 from b200_sxm_moe.csv (20% of shapes held out by CRC32 of the shape, see\n"
        "# service/planning/calibration_fit.py). `default` applies to every other GPU: the H100 fit plus the kernels\n"
        "# only the B200 runs (nvfp4, w4a8_mxfp4_mxfp8, the *_cutlass kernels). Models: service/planning/moe_cost.py\n"
        "# and mla_cost.py (`mla`: MlaCalibration fields). Do not edit fitted values by hand.\n"
    )
    sections = {"default": default, **values}
    body = yaml.safe_dump(_rounded(sections), sort_keys=True, default_flow_style=False)
    path.write_text(header + body, encoding="utf-8")
    print(f"wrote {path}")


def _rounded(value: Any) -> Any:
    """Six significant digits, so that the file is stable and readable."""
    if isinstance(value, dict):
        return {str(k): _rounded(v) for k, v in value.items()}
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


if __name__ == "__main__":
    main()
