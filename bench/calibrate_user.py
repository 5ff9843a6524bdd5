"""Calibrate from measurements as a user would (`splan calibrate`'s code path), then predict what was held out.

Usage: python -m bench.calibrate_user [--reference DIR] [--part peer|e2e|both] [--fraction 0.2] [--jobs J]
    [--models llama-2-70b,...]

peer: the peer suite's vLLM runs on H100 (../shared/reference/peer_suite). Per model, the load stages in run order
(experiment timestamp, then stage); the first ceil(fraction x stages) calibrate one profile for that model, the
other stages are predicted with and without it. The rows given to the fit are the stage summaries of the runs'
client (inference-perf, see bench/peer_suite.py): rate (Poisson arrivals), the prompt set it cycles through (groups x
prompts per group), mean prompt tokens, the requested output tokens, engine knobs, TTFT mean/p90/p99, E2E
mean/median. The ITL column is not fitted on: the client times two streamed messages per output token (ITL median
0.03 ms), so it is reported beside the predicted TPOT and as tpot_e2e ((E2E - TTFT) / (output tokens - 1)).
e2e: e2e_h100_sxm.csv split by model (bench/e2e_accuracy.py TRAIN_MODELS): one profile per engine fitted on its
training-model rows, the held-out models' rows scored before and after.
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import multiprocessing
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.e2e_accuracy import TRAIN_MODELS, ape, default_reference_dir, engine_for, model_for, pct, request_for_row
from bench.peer_suite import METRICS as PEER_METRICS
from bench.peer_suite import measured, peer_row, predicted_stage
from service.catalog.loader import default_catalog
from service.planning.estimate import run_estimate
from service.planning.specs import PlanningError
from service.planning.user_calibration import (
    CalibrationError,
    catalog_model_name,
    fit_profile,
    points_from_benchmark_rows,
    report_lines,
)

# Each fit's simulated work (sequence-steps): 25 s bought 12-19 million on the development machine. A work budget
# fits the same points with the same steps on any machine, so the figures this prints are reproducible.
DEFAULT_BUDGET_STEPS = 30_000_000


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):6.1f}" if values else "     –"


def peer_suite(
    reference: Path,
    fraction: float,
    budget_s: float,
    seeds: int,
    budget_steps: int | None,
    models: frozenset[str] = frozenset(),
) -> None:
    """Calibrate per model on its first stages, print per-stage predictions and the error table."""
    runs = [r for r in csv.DictReader((reference / "peer_suite" / "vllm_h100_runs.csv").open()) if int(r["stage"]) >= 0]
    by_model: dict[str, list[dict[str, str]]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: (r["experiment"], int(r["stage"]))):
        by_model[catalog_model_name(run["model"])].append(run)
    catalog = default_catalog()
    errors: dict[str, dict[str, list[float]]] = {"before": defaultdict(list), "after": defaultdict(list)}
    overloaded: dict[str, dict[str, list[float]]] = {"before": defaultdict(list), "after": defaultdict(list)}
    header = f"{'stage':50s} {'rate':>5s} " + " ".join(f"{m:>21s}" for m in PEER_METRICS)
    lines = [header, " " * 57 + " ".join(f"{'meas / before / after':>21s}" for _ in PEER_METRICS)]
    for model, stages in by_model.items():
        if models and model not in models:
            continue
        count = max(1, math.ceil(fraction * len(stages)))
        train, test = stages[:count], stages[count:]
        points = points_from_benchmark_rows([peer_row(r) for r in train], gpu="h100-sxm", engine="vllm", source=model)
        started = time.perf_counter()
        result = fit_profile(
            points,
            catalog=catalog,
            gpu="h100-sxm",
            engine="vllm",
            time_budget_s=budget_s,
            work_budget_sequence_steps=budget_steps,
        )
        print(
            f"== {model}: calibrated on {len(train)} of {len(stages)} stages in {time.perf_counter() - started:.1f} s"
        )
        for line in report_lines(result):
            print("   " + line)
        document = result.profile.as_document()
        for run in test:
            meas = measured(run)
            before = predicted_stage(run, catalog=catalog, seeds=seeds)
            after = predicted_stage(run, catalog=catalog, seeds=seeds, profile=document)
            bucket = overloaded if run["workload"] == "reasoning" else errors
            cells = []
            for metric in PEER_METRICS:
                bucket["before"][metric].append(ape(before[metric], meas[metric]))
                bucket["after"][metric].append(ape(after[metric], meas[metric]))
                cells.append(f"{meas[metric]:7.1f}/{before[metric]:6.1f}/{after[metric]:6.1f}")
            lines.append(f"{run['experiment'][-50:]:50s} {float(run['rate_req_s']):5.1f} " + " ".join(cells))
            print(lines[-1], flush=True)
    print()
    for line in lines:
        print(line)
    print()
    print("Median absolute % error over the predicted stages (not calibrated on):")
    print("| stages | " + " | ".join(PEER_METRICS) + " |")
    print("|---|" + "---:|" * len(PEER_METRICS))
    for label, bucket in (("served", errors), ("overloaded `reasoning`", overloaded)):
        n = len(bucket["before"]["ttft_mean"])
        for when in ("before", "after"):
            row_cells = " | ".join(_median(bucket[when][m]).strip() for m in PEER_METRICS)
            print(f"| {label} ({n}), {'uncalibrated' if when == 'before' else 'calibrated'} | {row_cells} |")


def _estimate(row: dict[str, str], profile: dict[str, Any] | None) -> tuple[float, float] | None:
    """(TTFT, TPOT) mean of one e2e row, or None when the estimate is refused."""
    try:
        request = replace(request_for_row(row), profile=profile)
        result = run_estimate(request, catalog=default_catalog()).result
    except PlanningError:
        return None
    return result.ttft.mean, result.tpot.mean


def e2e_split(reference: Path, budget_s: float, jobs: int, budget_steps: int | None) -> None:
    """Per engine: fit on the training models' rows, score the held-out models' rows before and after."""
    rows = list(csv.DictReader((reference / "e2e_h100_sxm.csv").open()))
    catalog = default_catalog()
    by_engine: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_engine[engine_for(row)].append(row)
    print(
        f"{'engine':10s} {'train rows':>10s} {'held-out':>8s} {'TPOT med before/after':>22s} "
        f"{'TPOT p90 before/after':>22s} {'TTFT med before/after':>22s} {'TTFT p90 before/after':>22s}"
    )
    table = []
    for engine, engine_rows in sorted(by_engine.items()):
        train = [r for r in engine_rows if model_for(r) in TRAIN_MODELS]
        held = [r for r in engine_rows if model_for(r) not in TRAIN_MODELS]
        if not train or not held:
            continue
        points = points_from_benchmark_rows(train, gpu="h100-sxm", engine=engine, source=engine)
        points = [p for p in points if {"ttft_mean", "tpot_mean"} <= set(p.observed_ms)]
        started = time.perf_counter()
        document: dict[str, Any] | None = None
        try:
            result = fit_profile(
                points,
                catalog=catalog,
                gpu="h100-sxm",
                engine=engine,
                time_budget_s=budget_s,
                work_budget_sequence_steps=budget_steps,
            )
        except CalibrationError as exc:
            # A refused fit is an answer too (the CLI's exit 2): the held-out rows keep the catalog's constants.
            print(f"== {engine}: fit refused after {time.perf_counter() - started:.1f} s: {exc}")
        else:
            print(f"== {engine}: fitted in {time.perf_counter() - started:.1f} s")
            for line in report_lines(result):
                print("   " + line)
            document = result.profile.as_document()
        with multiprocessing.Pool(jobs) as pool:
            before = pool.map(functools.partial(_estimate, profile=None), held, chunksize=4)
            after = before
            if document is not None:
                after = pool.map(functools.partial(_estimate, profile=document), held, chunksize=4)
        errs: dict[str, list[float]] = defaultdict(list)
        for row, b, a in zip(held, before, after, strict=True):
            for when, value in (("before", b), ("after", a)):
                tt = 100.0 if value is None else ape(value[0], float(row["ttft_ms"]))
                tp = 100.0 if value is None else ape(value[1], float(row["tpot_ms"]))
                errs[f"ttft_{when}"].append(tt)
                errs[f"tpot_{when}"].append(tp)
        cells = []
        for metric in ("tpot", "ttft"):
            errs_before, errs_after = errs[f"{metric}_before"], errs[f"{metric}_after"]
            cells.append(f"{statistics.median(errs_before):9.1f} / {statistics.median(errs_after):6.1f}%")
            cells.append(f"{pct(errs_before, 90):9.1f} / {pct(errs_after, 90):6.1f}%")
        label = engine if document is not None else f"{engine}*"
        table.append(f"{label:10s} {len(points):10d} {len(held):8d} " + " ".join(f"{c:>22s}" for c in cells))
    print()
    print(
        f"{'engine':10s} {'train rows':>10s} {'held-out':>8s} {'TPOT med before/after':>22s} "
        f"{'TPOT p90 before/after':>22s} {'TTFT med before/after':>22s} {'TTFT p90 before/after':>22s}"
    )
    for line in table:
        print(line)
    if any("*" in line.split()[0] for line in table):
        print("* fit refused (unphysical values needed): after = before, the catalog's constants")


def main() -> int:
    """Run the chosen parts."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=default_reference_dir())
    parser.add_argument("--part", choices=["peer", "e2e", "both"], default="both")
    parser.add_argument("--fraction", type=float, default=0.2, help="share of each model's stages to calibrate on")
    parser.add_argument(
        "--budget-s", type=float, default=25.0, help="time budget of each fit, with --budget-steps 0 (machine-bound)"
    )
    parser.add_argument(
        "--budget-steps",
        type=int,
        default=DEFAULT_BUDGET_STEPS,
        help="simulated sequence-steps each fit may use (reproducible on any machine); 0: use --budget-s instead",
    )
    parser.add_argument("--jobs", type=int, default=1, help="processes for the held-out e2e estimates")
    parser.add_argument("--seeds", type=int, default=3, help="arrival draws averaged per predicted peer stage")
    parser.add_argument("--models", default="", help="comma-separated catalog models of the peer part (default: all)")
    args = parser.parse_args()
    if args.part in ("peer", "both"):
        models = frozenset(m for m in args.models.split(",") if m)
        peer_suite(args.reference, args.fraction, args.budget_s, args.seeds, args.budget_steps or None, models)
    if args.part in ("e2e", "both"):
        e2e_split(args.reference, args.budget_s, args.jobs, args.budget_steps or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
