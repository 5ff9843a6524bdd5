"""Where the decode-attention model is fast or slow: median predicted / measured time by KV bytes x CTAs.

Usage: python -m bench.decode_attention_bins [--reference DIR] [--gpu h100-sxm|b200] [--calibration FILE]

Rows of <gpu>_attention_generation.csv, binned by the KV bytes one layer reads (batch x (past + 1) x 2 x KV heads
x head_dim x bytes per element) and by the CTAs before split-KV (batch x KV heads); one table per KV dtype, each
cell the median ratio and the row count. A serving decode batch sits in the lower right: hundreds of sequences x
their KV heads, hundreds of MB per layer. With --calibration, that calibration.yaml's decode-attention constants
replace the catalog's (to compare a fit before it is written).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.calibrate import GPUS, default_reference_dir, load_tables
from service.catalog.loader import default_catalog
from service.planning.kernel_accuracy import measured_s, predict_attention_generation

BYTES_EDGES = (0.0, 1e6, 1e7, 5e7, 1e8, 2e8, 4e8, 1e9, math.inf)
CTA_EDGES = (0.0, 64.0, 256.0, 1024.0, 2048.0, math.inf)


def _label(lo: float, hi: float, unit: str) -> str:
    return f">{lo:g}{unit}" if math.isinf(hi) else f"{lo:g}-{hi:g}{unit}"


def bins(rows: np.ndarray, ratio: np.ndarray) -> dict[str, list[list[tuple[float, int]]]]:
    """Per KV dtype, a grid (bytes bin x CTA bin) of (median ratio, rows)."""
    per_elem = np.where(rows["kv_cache_dtype"] == "fp8", 1.0, 2.0)
    kv_bytes = (
        rows["batch_size"] * (rows["past_kv_len"] + 1.0) * 2 * rows["num_key_value_heads"] * rows["head_dim"] * per_elem
    )
    ctas = rows["batch_size"] * rows["num_key_value_heads"]
    out: dict[str, list[list[tuple[float, int]]]] = {}
    for dtype in ("bf16", "fp8"):
        grid = []
        for b_lo, b_hi in itertools.pairwise(BYTES_EDGES):
            line = []
            for c_lo, c_hi in itertools.pairwise(CTA_EDGES):
                sel = (
                    (rows["kv_cache_dtype"] == dtype)
                    & (kv_bytes > b_lo)
                    & (kv_bytes <= b_hi)
                    & (ctas > c_lo)
                    & (ctas <= c_hi)
                )
                n = int(sel.sum())
                line.append((float(np.median(ratio[sel])) if n else float("nan"), n))
            grid.append(line)
        out[dtype] = grid
    return out


def decode_overrides(path: Path, gpu: str) -> dict[str, Any]:
    """The decode-attention constants a calibration.yaml gives one GPU (its `default`, then its own key)."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    default = doc.get("default") or {} if isinstance(doc, dict) else None
    own = doc.get(gpu) or {} if isinstance(doc, dict) else None
    if not isinstance(default, dict) or not isinstance(own, dict):
        raise ValueError("not a calibration file: expected a mapping with `default` and per-GPU sections")
    return {k: v for k, v in {**default, **own}.items() if k.startswith("attention_decode")}


def main() -> int:
    """Print the binned ratio tables for one GPU."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=default_reference_dir())
    parser.add_argument("--gpu", default="h100-sxm", choices=sorted(GPUS))
    parser.add_argument("--calibration", type=Path, help="a calibration.yaml whose decode constants to use")
    args = parser.parse_args()
    catalog = default_catalog()
    gpu = catalog.gpu(args.gpu)
    calibration = catalog.calibration_for(gpu)
    if args.calibration is not None:
        try:
            calibration = calibration.with_overrides(decode_overrides(args.calibration, args.gpu))
        except (OSError, yaml.YAMLError, ValueError) as err:
            print(f"decode_attention_bins: {args.calibration}: {err}".splitlines()[0], file=sys.stderr)
            return 2
    rows = load_tables(args.reference, GPUS[args.gpu]).get("attention_generation")
    if rows is None:
        print(f"no attention_generation table for {args.gpu}", file=sys.stderr)
        return 2
    ratio = predict_attention_generation(rows, gpu=gpu, calibration=calibration) / measured_s(rows)
    header = (
        "| KV bytes per layer | "
        + " | ".join(_label(lo, hi, " CTAs") for lo, hi in itertools.pairwise(CTA_EDGES))
        + " |"
    )
    for dtype, grid in bins(rows, ratio).items():
        print(f"\n{args.gpu}, {dtype} KV cache: median predicted / measured (rows)\n")
        print(header)
        print("|---|" + "---:|" * (len(CTA_EDGES) - 1))
        for (lo, hi), line in zip(itertools.pairwise(BYTES_EDGES), grid, strict=True):
            cells = " | ".join("–" if n == 0 else f"{r:.3f} ({n})" for r, n in line)
            print(f"| {_label(lo, hi, ' B')} | {cells} |")
    error_pct = np.abs(ratio - 1) * 100
    print(f"\nall rows: median |error| {np.median(error_pct):.1f}%, p90 {np.quantile(error_pct, 0.9):.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
