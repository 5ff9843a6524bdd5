"""Score `splan estimate` against the measured end-to-end runs in ../shared/reference/e2e_h100_sxm.csv.

Usage: python bench/e2e_accuracy.py [--reference DIR] [--out predictions.csv] [--limit N]
Each row is estimated exactly as `splan estimate` would (same code path, same defaults).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

from service.catalog.loader import default_catalog
from service.planning.deployment import Mode
from service.planning.estimate import EstimateRequest, run_estimate

MODEL_NAMES = {
    "qwen3-32b": "qwen3-32b",
    "llama-3.1-8b-instruct": "llama-3.1-8b",
    "llama-3.1-8b": "llama-3.1-8b",
    "llama-3.1-70b": "llama-3.1-70b",
}


def default_reference_dir() -> Path:
    """../shared/reference next to the repository, or $SPLAN_REFERENCE_DIR."""
    env = os.environ.get("SPLAN_REFERENCE_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "reference"


def _int(value: str) -> int:
    return int(float(value)) if value else 0


def engine_for(row: dict[str, str]) -> str:
    """The catalog engine of a run: vLLM before 0.14 schedules synchronously."""
    version = row.get("backend_version", "")
    if row["backend"] == "vllm" and version and tuple(int(p) for p in version.split(".")[:2]) < (0, 14):
        return "vllm-0.12"
    return row["backend"]


def request_for_row(row: dict[str, str], *, client_start: str = "burst") -> EstimateRequest:
    """The estimate request that reproduces one measured run."""
    weight = "fp8" if row["precision"] == "fp8" else "bf16"
    concurrency = _int(row["concurrency"]) or _int(row["batch_size"])
    common = {
        "model": MODEL_NAMES[row["model"].lower()],
        "gpu": "h100-sxm",
        "engine": engine_for(row),
        "weight_dtype": weight,
        "isl": row["isl"],
        "osl": row["osl"],
        "client_start": client_start,
    }
    if row["mode"] == "disagg":
        workers = _int(row["decode_num_workers"])
        concurrency = concurrency or _int(row["decode_batch_size"]) * workers
        return EstimateRequest(
            **common,
            mode=Mode.DISAGGREGATED,
            prefill_tp=_int(row["prefill_tp_size"]),
            prefill_workers=_int(row["prefill_num_workers"]),
            decode_tp=_int(row["decode_tp_size"]),
            decode_workers=workers,
            concurrency=concurrency,
        )
    return EstimateRequest(
        **common,
        tp=_int(row["tp_size"]) or 1,
        pp=_int(row["pp_size"]) or 1,
        concurrency=concurrency,
    )


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


def main() -> int:
    """Run every row and print median / p90 absolute % error overall and per group."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reference", type=Path, default=default_reference_dir())
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--client-start", choices=["burst", "staggered"], default="burst")
    args = parser.parse_args()
    rows = list(csv.DictReader((args.reference / "e2e_h100_sxm.csv").open()))
    if args.limit:
        rows = rows[:: max(1, len(rows) // args.limit)]
    catalog = default_catalog()
    results: list[dict[str, object]] = []
    started = time.perf_counter()
    for row in rows:
        request = request_for_row(row, client_start=args.client_start)
        estimate = run_estimate(request, catalog=catalog)
        ttft = estimate.result.ttft.mean
        tpot = estimate.result.tpot.mean
        results.append(
            {
                "group": f"{row['model']}/{row['backend']}/{row['mode']}/{row['precision']}",
                "ttft_ms": float(row["ttft_ms"]),
                "tpot_ms": float(row["tpot_ms"]),
                "pred_ttft_ms": ttft,
                "pred_tpot_ms": tpot,
                "ttft_ape": ape(ttft, float(row["ttft_ms"])),
                "tpot_ape": ape(tpot, float(row["tpot_ms"])),
                "row": row,
            }
        )
    elapsed = time.perf_counter() - started
    groups = sorted({str(r["group"]) for r in results})
    print(f"{'group':48s} {'rows':>5s} {'TPOT med':>9s} {'TPOT p90':>9s} {'TTFT med':>9s} {'TTFT p90':>9s}")
    for group in [*groups, "ALL"]:
        sel = [r for r in results if group in ("ALL", r["group"])]
        tp = [float(str(r["tpot_ape"])) for r in sel]
        tt = [float(str(r["ttft_ape"])) for r in sel]
        print(
            f"{group:48s} {len(sel):5d} {statistics.median(tp):8.1f}% {pct(tp, 90):8.1f}% "
            f"{statistics.median(tt):8.1f}% {pct(tt, 90):8.1f}%"
        )
    print(f"{len(results)} rows in {elapsed:.1f} s ({elapsed / max(1, len(results)) * 1e3:.0f} ms per estimate)")
    if args.out:
        with args.out.open("w", newline="") as handle:
            fields = [*rows[0].keys(), "pred_ttft_ms", "pred_tpot_ms", "ttft_ape", "tpot_ape"]
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            for r in results:
                row_out = dict(r["row"])  # type: ignore[call-overload]
                row_out.update({k: r[k] for k in ("pred_ttft_ms", "pred_tpot_ms", "ttft_ape", "tpot_ape")})
                writer.writerow(row_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
