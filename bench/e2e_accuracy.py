"""Score `splan estimate` against the measured end-to-end runs in ../shared/reference/e2e_h100_sxm.csv.

Usage: python bench/e2e_accuracy.py [--reference DIR] [--out predictions.csv] [--limit N]
Each row is estimated exactly as `splan estimate` would (same code path, same defaults); the row -> request mapping
is service/planning/user_calibration.py's, shared with `splan calibrate`.
"""

from __future__ import annotations

import argparse
import csv
import functools
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from service.catalog.loader import default_catalog
from service.planning.estimate import EstimateRequest, run_estimate
from service.planning.specs import PlanningError
from service.planning.user_calibration import (
    MODEL_ALIASES,
    MOE_MODELS,
    engine_for,
    request_for_benchmark_row,
)

# Re-exported for bench/fit_engines.py and bench/peer_suite.py.
__all__ = ["MOE_MODELS", "TRAIN_MODELS", "default_reference_dir", "engine_for", "model_for", "request_for_row"]

MODEL_NAMES = MODEL_ALIASES
# Split by model, never by row: engine CPU constants are fitted on TRAIN_MODELS (bench/fit_engines.py) and
# reported on the others. Each engine family gets dense training rows, where the kernel model is best checked
# (vLLM >= 0.14: Llama-3.1-70B; vLLM 0.12, SGLang, TRT-LLM: Qwen3-32B), plus MoE rows; the held-out side keeps a
# dense model (Llama-3.1-8B on TRT-LLM) and three MoE models. DeepSeek-R1 and V3 share one architecture, so they
# sit on the same side.
TRAIN_MODELS = frozenset({"qwen3-32b", "llama-3.1-70b", "qwen3-235b-a22b", "gpt-oss-120b"})


def default_reference_dir() -> Path:
    """../shared/reference next to the repository, or $SPLAN_REFERENCE_DIR."""
    env = os.environ.get("SPLAN_REFERENCE_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "reference"


def model_for(row: dict[str, str]) -> str:
    """Catalog name of a run's model."""
    return MODEL_NAMES[row["model"].lower()]


def request_for_row(row: dict[str, str], *, client_start: str = "benchmark") -> EstimateRequest:
    """The estimate request that reproduces one measured run (the mapping `splan calibrate` uses for such rows)."""
    return request_for_benchmark_row(row, gpu="h100-sxm", model=model_for(row), client_start=client_start)


def apply_corrections(rows: list[dict[str, str]], doc: dict[str, Any] | None) -> tuple[list[dict[str, str]], int]:
    """Rows with each correction's columns set where all its ``match`` columns agree; and how many changed."""
    out, changed = [], 0
    for row in rows:
        fixed = dict(row)
        for entry in (doc or {}).get("corrections", []):
            if all(str(row.get(k, "")) == str(v) for k, v in entry["match"].items()):
                fixed.update({k: str(v) for k, v in entry["set"].items()})
        changed += fixed != row
        out.append(fixed)
    return out, changed


def ape(predicted: float, actual: float) -> float:
    """Absolute percentage error."""
    return abs(predicted - actual) / actual * 100.0


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def estimate_row(row: dict[str, str], client_start: str = "benchmark") -> dict[str, object]:
    """Estimate one row; a refusal is kept as a miss (error 100%) with its reason."""
    model = model_for(row)
    out: dict[str, object] = {
        "group": f"{row['model']}/{row['backend']}/{row['mode']}/{row['precision']}",
        "split": "train" if model in TRAIN_MODELS else "held-out",
        "kind": "moe" if model in MOE_MODELS else "dense",
        "ttft_ms": float(row["ttft_ms"]),
        "tpot_ms": float(row["tpot_ms"]),
        "row": row,
    }
    try:
        estimate = run_estimate(request_for_row(row, client_start=client_start), catalog=default_catalog())
    except PlanningError as exc:
        return {**out, "refused": str(exc), "ttft_ape": 100.0, "tpot_ape": 100.0}
    ttft, tpot = estimate.result.ttft.mean, estimate.result.tpot.mean
    return {
        **out,
        "refused": "",
        "pred_ttft_ms": ttft,
        "pred_tpot_ms": tpot,
        "ttft_ape": ape(ttft, float(row["ttft_ms"])),
        "tpot_ape": ape(tpot, float(row["tpot_ms"])),
    }


def summary_line(label: str, sel: list[dict[str, object]]) -> str:
    """One table row: rows, refusals, TPOT and TTFT median/p90 absolute % error."""
    tp = [float(str(r["tpot_ape"])) for r in sel]
    tt = [float(str(r["ttft_ape"])) for r in sel]
    refused = sum(1 for r in sel if r["refused"])
    return (
        f"{label:52s} {len(sel):5d} {refused:7d} {statistics.median(tp):8.1f}% {pct(tp, 90):8.1f}% "
        f"{statistics.median(tt):8.1f}% {pct(tt, 90):8.1f}%"
    )


def main() -> int:
    """Run every row and print median / p90 absolute % error per group, dense/MoE and train/held-out."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reference", type=Path, default=default_reference_dir())
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--client-start", choices=["benchmark", "burst", "staggered"], default="benchmark")
    parser.add_argument("--model", default=None, help="only rows of this catalog model")
    parser.add_argument(
        "--corrections",
        type=Path,
        default=None,
        help="a YAML of layout corrections with sources (bench/data/reference_corrections.yaml); default: none, "
        "every row as recorded",
    )
    args = parser.parse_args()
    rows = list(csv.DictReader((args.reference / "e2e_h100_sxm.csv").open()))
    if args.corrections:
        rows, corrected = apply_corrections(rows, yaml.safe_load(args.corrections.read_text(encoding="utf-8")))
        print(f"{corrected} rows corrected by {args.corrections}")
    if args.model:
        rows = [r for r in rows if model_for(r) == args.model]
    if args.limit:
        rows = rows[:: max(1, len(rows) // args.limit)]
    started = time.perf_counter()
    work = functools.partial(estimate_row, client_start=args.client_start)
    if args.jobs > 1:
        with multiprocessing.Pool(args.jobs) as pool:
            results = pool.map(work, rows, chunksize=4)
    else:
        results = [work(row) for row in rows]
    elapsed = time.perf_counter() - started
    print(
        f"{'group':52s} {'rows':>5s} {'refused':>7s} "
        f"{'TPOT med':>9s} {'TPOT p90':>9s} {'TTFT med':>9s} {'TTFT p90':>9s}"
    )
    for group in sorted({str(r["group"]) for r in results}):
        print(summary_line(group, [r for r in results if r["group"] == group]))
    for split in ("train", "held-out"):
        for kind in ("dense", "moe"):
            sel = [r for r in results if r["split"] == split and r["kind"] == kind]
            if sel:
                print(summary_line(f"{split.upper()} {kind}", sel))
        in_split = [r for r in results if r["split"] == split]
        if in_split:
            print(summary_line(f"{split.upper()} all", in_split))
    print(summary_line("ALL", results))
    for r in results:
        if r["refused"]:
            print(f"refused: {r['group']}: {r['refused']}")
    print(
        f"{len(results)} rows in {elapsed:.1f} s "
        f"({elapsed / max(1, len(results)) * 1e3:.0f} ms per estimate wall, {args.jobs} jobs)"
    )
    if args.out:
        with args.out.open("w", newline="") as handle:
            extra = ["pred_ttft_ms", "pred_tpot_ms", "ttft_ape", "tpot_ape", "refused"]
            columns = list(dict.fromkeys(column for row in rows for column in row))
            writer = csv.DictWriter(handle, fieldnames=[*columns, *extra])
            writer.writeheader()
            for r in results:
                row_out = dict(r["row"])  # type: ignore[call-overload]
                row_out.update({k: r.get(k, "") for k in extra})
                writer.writerow(row_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
