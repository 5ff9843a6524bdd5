"""Score `splan estimate` against the measured end-to-end runs in ../shared/reference/e2e_h100_sxm.csv.

Usage: python bench/e2e_accuracy.py [--reference DIR] [--out predictions.csv] [--limit N]
Each row is estimated exactly as `splan estimate` would (same code path, same defaults).
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

from service.catalog.loader import default_catalog
from service.planning.deployment import Mode
from service.planning.estimate import EstimateRequest, run_estimate
from service.planning.specs import PlanningError

MODEL_NAMES = {
    "qwen3-32b": "qwen3-32b",
    "llama-3.1-8b-instruct": "llama-3.1-8b",
    "llama-3.1-8b": "llama-3.1-8b",
    "llama-3.1-70b": "llama-3.1-70b",
    "deepseek-r1": "deepseek-r1",
    "deepseek-v3": "deepseek-v3",
    "minimax-m2.5": "minimax-m2.5",
    "qwen3-235b-a22b-fp8": "qwen3-235b-a22b",
    "gpt-oss-120b": "gpt-oss-120b",
}
# Split by model, never by row: engine CPU constants are fitted on TRAIN_MODELS (bench/fit_engines.py) and
# reported on the others. Each engine family gets dense training rows, where the kernel model is best checked
# (vLLM >= 0.14: Llama-3.1-70B; vLLM 0.12, SGLang, TRT-LLM: Qwen3-32B), plus MoE rows; the held-out side keeps a
# dense model (Llama-3.1-8B on TRT-LLM) and three MoE models. DeepSeek-R1 and V3 share one architecture, so they
# sit on the same side.
TRAIN_MODELS = frozenset({"qwen3-32b", "llama-3.1-70b", "qwen3-235b-a22b", "gpt-oss-120b"})
MOE_MODELS = frozenset({"deepseek-r1", "deepseek-v3", "minimax-m2.5", "qwen3-235b-a22b", "gpt-oss-120b"})


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


def _dtypes(row: dict[str, str], model: str) -> tuple[str, str | None]:
    """(dense weight dtype, expert weight dtype) of a run from its precision and quant-mode columns."""
    if row["precision"] == "unrecorded":
        return "bf16", None
    if row["precision"] == "fp4" and model.startswith("gpt-oss"):
        # gpt-oss ships mxfp4 experts with bf16 attention; on Hopper vLLM runs the experts weight-only.
        return "bf16", "mxfp4"
    gemm = row.get("gemm_quant_mode") or row["precision"]
    moe = row.get("moe_quant_mode") or gemm
    names = {"fp8": "fp8", "fp8_block": "fp8", "nvfp4": "fp4", "fp4": "fp4"}
    return names.get(gemm, "bf16"), names.get(moe, "bf16") if model in MOE_MODELS else None


def _pool(row: dict[str, str], prefix: str) -> dict[str, int | None]:
    """Layout fields of one pool (prefix '' for collocated rows, 'prefill_' or 'decode_')."""
    tp = _int(row[f"{prefix}tp_size"]) or 1
    dp = _int(row.get(f"{prefix}attention_dp_size", "")) or 1
    moe_tp = _int(row.get(f"{prefix}moe_tp_size", ""))
    moe_ep = _int(row.get(f"{prefix}moe_ep_size", ""))
    if moe_tp * moe_ep != tp * dp:
        # Layout not recorded (older rows) or inconsistent: the engine's default, experts cut like attention.
        moe_tp, moe_ep = 0, 1
    return {
        "tp": tp,
        "pp": _int(row[f"{prefix}pp_size"]) or 1,
        "attention_dp": dp,
        "moe_tp": moe_tp or None,
        "moe_ep": moe_ep or 1,
    }


# InferenceX (SemiAnalysisAI/InferenceX, benchmarks/benchmark_lib.sh and utils/bench_serving/benchmark_serving.py at
# 843c625): ISL/OSL 1k/1k, 1k/8k, 8k/1k; `--random-range-ratio 0.8` draws each request's input and output length
# uniformly from [int(0.8 L), L]; `--num-prompts 10 x CONC --max-concurrency CONC --request-rate inf --ignore-eos`
# after 2 x CONC warm-up requests. The dated CSV exports (`source_kind` source_file) are these sweeps.
INFERENCEX_SHAPES = frozenset({(1024, 1024), (1024, 8192), (8192, 1024)})
INFERENCEX_RANGE_RATIO = 0.8
INFERENCEX_REQUESTS_PER_CLIENT = 10


def client_lengths(row: dict[str, str]) -> tuple[str, str, int | None]:
    """(isl, osl, requests per client) as the row's benchmark client drew them."""
    isl, osl = _int(row["isl"]), _int(row["osl"])
    if row.get("source_kind") == "source_file" and (isl, osl) in INFERENCEX_SHAPES:

        def ranged(tokens: int) -> str:
            return f"uniform:{int(tokens * INFERENCEX_RANGE_RATIO)}:{tokens}"

        return ranged(isl), ranged(osl), INFERENCEX_REQUESTS_PER_CLIENT
    # The other rows come from aiperf sweeps with exact lengths (docs/ENGINES.md).
    return str(isl), str(osl), None


def model_for(row: dict[str, str]) -> str:
    """Catalog name of a run's model."""
    return MODEL_NAMES[row["model"].lower()]


def request_for_row(row: dict[str, str], *, client_start: str = "benchmark") -> EstimateRequest:
    """The estimate request that reproduces one measured run."""
    model = model_for(row)
    weight, moe_weight = _dtypes(row, model)
    concurrency = _int(row["concurrency"]) or _int(row["batch_size"])
    isl, osl, requests_per_client = client_lengths(row)
    common: dict[str, object] = {
        "model": model,
        "gpu": "h100-sxm",
        "engine": engine_for(row),
        "weight_dtype": weight,
        "moe_weight_dtype": moe_weight,
        "isl": isl,
        "osl": osl,
        "client_start": client_start,
        "requests_per_client": requests_per_client,
    }
    if row["mode"] == "disagg":
        workers = _int(row["decode_num_workers"]) or 1
        concurrency = concurrency or _int(row["decode_batch_size"]) * workers
        prefill, decode = _pool(row, "prefill_"), _pool(row, "decode_")
        return EstimateRequest(
            **common,  # type: ignore[arg-type]
            mode=Mode.DISAGGREGATED,
            prefill_tp=int(prefill["tp"] or 1),
            prefill_pp=int(prefill["pp"] or 1),
            prefill_attention_dp=int(prefill["attention_dp"] or 1),
            prefill_moe_tp=prefill["moe_tp"],
            prefill_moe_ep=int(prefill["moe_ep"] or 1),
            prefill_workers=_int(row["prefill_num_workers"]) or 1,
            decode_tp=int(decode["tp"] or 1),
            decode_pp=int(decode["pp"] or 1),
            decode_attention_dp=int(decode["attention_dp"] or 1),
            decode_moe_tp=decode["moe_tp"],
            decode_moe_ep=int(decode["moe_ep"] or 1),
            decode_workers=workers,
            concurrency=concurrency,
        )
    pool = _pool(row, "")
    return EstimateRequest(
        **common,  # type: ignore[arg-type]
        tp=int(pool["tp"] or 1),
        pp=int(pool["pp"] or 1),
        attention_dp=int(pool["attention_dp"] or 1),
        moe_tp=pool["moe_tp"],
        moe_ep=int(pool["moe_ep"] or 1),
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
    args = parser.parse_args()
    rows = list(csv.DictReader((args.reference / "e2e_h100_sxm.csv").open()))
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
            writer = csv.DictWriter(handle, fieldnames=[*rows[0].keys(), *extra])
            writer.writeheader()
            for r in results:
                row_out = dict(r["row"])  # type: ignore[call-overload]
                row_out.update({k: r.get(k, "") for k in extra})
                writer.writerow(row_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
