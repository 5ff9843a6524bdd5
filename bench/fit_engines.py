"""Fit each engine's CPU constants on the training models' end-to-end rows; write engine_calibration.yaml.

Usage: python -m bench.fit_engines [--reference DIR] [--rows-per-engine N] [--jobs J] [--dry-run]

The split is by model (bench/e2e_accuracy.py TRAIN_MODELS, collocated rows), never by row: the held-out models
are scored by `python bench/e2e_accuracy.py`. Per engine the fit moves three constants of its engine entry —
step_overhead_s (CPU time per step), per_sequence_overhead_s (per running sequence per step) and
step_gap_s (GPU idle per step that overlap cannot hide) — to minimise the robust log error of mean TPOT
(weight 1) and mean TTFT (weight 0.3) over a deterministic subsample of that engine's training rows. A second
stage then sets request_overhead_s (the API server's latency per request, added to TTFT and E2E) to the value on
REQUEST_OVERHEAD_GRID_S with the lowest median TTFT log error on the engine's low-load training rows (concurrency
≤ LOW_LOAD_CONCURRENCY, where a constant latency is not confounded with queueing), each simulated under its
benchmark client's full protocol. `--request-overhead-only` runs only that stage over the constants already in the file.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import math
import multiprocessing
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy.optimize import least_squares  # type: ignore[import-untyped]

from bench.e2e_accuracy import TRAIN_MODELS, default_reference_dir, engine_for, model_for, request_for_row
from service.catalog.loader import DATA_DIR, default_catalog, parse_yaml
from service.planning.estimate import run_estimate
from service.planning.specs import PlanningError

PARAMS = ("step_overhead_s", "per_sequence_overhead_s", "step_gap_s")
LOWER_S = (1e-5, 1e-7, 0.0)
UPPER_S = (1e-2, 5e-4, 5e-3)
TTFT_WEIGHT = 0.3
# Candidate API-server latencies per request (seconds), from none to a tenth of a second.
REQUEST_OVERHEAD_GRID_S = (0.0, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.125, 0.15)
LOW_LOAD_CONCURRENCY = 16
OUTPUT = DATA_DIR / "engine_calibration.yaml"


def _errors(
    values: tuple[float, ...], engine: str, row: dict[str, str], request_overhead_s: float | None = None
) -> tuple[float, float]:
    """Log errors (TPOT, TTFT) of one row with the engine's constants set to ``values``.

    With ``request_overhead_s`` given, the row runs its benchmark client's full protocol with that front-end latency.
    """
    catalog = default_catalog()
    # EngineSpec fields of several types are replaced by name: the values are floats, the mapping is not narrower.
    changes: dict[str, Any] = dict(zip(PARAMS, values, strict=True))
    request = request_for_row(row)
    if request_overhead_s is None:
        # Fewer profiled requests per client than the benchmark keeps the fit fast; means barely move. The step
        # constants are fitted without front-end latency (the second stage adds it), so a rerun reproduces them.
        request = replace(request, requests=max(32, 4 * (int(float(row["concurrency"] or 0)) or 8)))
        changes["request_overhead_s"] = 0.0
    else:
        changes["request_overhead_s"] = request_overhead_s
    spec = replace(catalog.engines[engine], **changes)
    patched = replace(catalog, engines={**catalog.engines, engine: spec})
    try:
        result = run_estimate(request, catalog=patched).result
    except PlanningError:
        return math.log(3.0), math.log(3.0)
    tpot = math.log(max(result.tpot.mean, 1e-6) / float(row["tpot_ms"]))
    ttft = math.log(max(result.ttft.mean, 1e-6) / float(row["ttft_ms"]))
    return tpot, ttft


def _residuals(x: np.ndarray, engine: str, rows: list[dict[str, str]], pool: multiprocessing.pool.Pool) -> np.ndarray:
    values = _values(x)
    errors = pool.map(functools.partial(_errors, values, engine), rows)
    return np.array([e for tpot, ttft in errors for e in (tpot, TTFT_WEIGHT * ttft)])


def _values(x: np.ndarray) -> tuple[float, ...]:
    """Constants from the fit vector: the first two in log space, the gap in milliseconds."""
    return (float(math.exp(x[0])), float(math.exp(x[1])), float(x[2]) * 1e-3)


def fit_engine(engine: str, rows: list[dict[str, str]], pool: multiprocessing.pool.Pool) -> dict[str, float]:
    """Fit one engine's constants; returns them with the training residual."""
    # Start from the engines.yaml values, not an earlier fit, so that a rerun reproduces the file.
    prior = parse_yaml((DATA_DIR / "engines.yaml").read_text())[engine]
    start = np.array(
        [
            math.log(float(prior["step_overhead_s"])),
            math.log(float(prior["per_sequence_overhead_s"])),
            float(prior["step_gap_s"]) * 1e3,
        ]
    )
    lower = np.array([math.log(LOWER_S[0]), math.log(LOWER_S[1]), LOWER_S[2] * 1e3])
    upper = np.array([math.log(UPPER_S[0]), math.log(UPPER_S[1]), UPPER_S[2] * 1e3])
    fit = least_squares(
        _residuals,
        np.clip(start, lower, upper),
        bounds=(lower, upper),
        args=(engine, rows, pool),
        loss="soft_l1",
        f_scale=0.1,
        diff_step=0.05,
        max_nfev=30,
    )
    values = _values(fit.x)
    tpot_errors = [abs(math.exp(t) - 1.0) * 100 for t, _ in pool.map(functools.partial(_errors, values, engine), rows)]
    out = {name: float(f"{value:.4g}") for name, value in zip(PARAMS, values, strict=True)}
    out["train_tpot_median_ape_pct"] = round(statistics.median(tpot_errors), 2)
    out["train_rows"] = len(rows)
    return out


def fit_request_overhead(
    engine: str, rows: list[dict[str, str]], values: tuple[float, ...], pool: multiprocessing.pool.Pool
) -> dict[str, float]:
    """The grid's front-end latency with the lowest median TTFT log error, with that error."""
    best: tuple[float, float] | None = None
    for overhead_s in REQUEST_OVERHEAD_GRID_S:
        errors = pool.map(functools.partial(_errors, values, engine, request_overhead_s=overhead_s), rows)
        score = statistics.median(abs(ttft) for _, ttft in errors)
        print(f"  {engine} request_overhead_s={overhead_s:g}: TTFT median log error {score:.3f}", flush=True)
        if best is None or score < best[1] - 1e-9:
            best = (overhead_s, score)
    assert best is not None
    return {
        "request_overhead_s": best[0],
        "train_ttft_median_ape_pct": round((math.exp(best[1]) - 1.0) * 100, 2),
    }


def _spread(rows: list[dict[str, str]], count: int) -> list[dict[str, str]]:
    """A deterministic subsample with an equal share per model (no model outweighs the others)."""
    by_model: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_model.setdefault(model_for(row), []).append(row)
    share = max(1, count // len(by_model))
    out: list[dict[str, str]] = []
    for model_rows in by_model.values():
        step = max(1, len(model_rows) // share)
        out.extend(model_rows[::step][:share])
    return out


def main() -> int:
    """Fit every engine that has training rows and write the calibration file."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reference", type=Path, default=default_reference_dir())
    parser.add_argument("--rows-per-engine", type=int, default=24)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--engine", action="append", default=[], help="only these engines")
    parser.add_argument("--dry-run", action="store_true", help="print, do not write")
    parser.add_argument(
        "--request-overhead-only",
        action="store_true",
        help="keep the step constants already in engine_calibration.yaml; fit only request_overhead_s",
    )
    args = parser.parse_args()
    rows = list(csv.DictReader((args.reference / "e2e_h100_sxm.csv").open()))
    by_engine: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        # Collocated rows: the disaggregated ones are few and their pool sizes are often not recorded.
        if model_for(row) in TRAIN_MODELS and row["mode"] == "agg":
            by_engine.setdefault(engine_for(row), []).append(row)
    with multiprocessing.Pool(args.jobs) as pool:
        for engine, engine_rows in sorted(by_engine.items()):
            if args.engine and engine not in args.engine:
                continue
            subsample = _spread(engine_rows, args.rows_per_engine)
            fitted = _stored(engine) if args.request_overhead_only else fit_engine(engine, subsample, pool)
            values = tuple(float(fitted[name]) for name in PARAMS)
            low_load = [r for r in engine_rows if 0 < float(r["concurrency"] or 0) <= LOW_LOAD_CONCURRENCY]
            fitted.update(fit_request_overhead(engine, _spread(low_load, args.rows_per_engine), values, pool))
            print(f"{engine:10s} {fitted}", flush=True)
            if not args.dry_run:
                # Written engine by engine: a long fit of one engine keeps what the others found.
                _write(engine, fitted)
    return 0


def _stored(engine: str) -> dict[str, float]:
    """The step constants and training figures already written for ``engine``."""
    existing = yaml.safe_load(OUTPUT.read_text()) if OUTPUT.exists() else {}
    if not existing or engine not in existing:
        raise SystemExit(f"fit_engines: no stored constants for {engine}; run the full fit first")
    out = {name: float(existing[engine][name]) for name in PARAMS}
    for line in OUTPUT.read_text().splitlines():
        if line.startswith(f"# {engine}: ") and "training rows" in line:
            words = line.split()
            out["train_rows"] = float(words[2])
            out["train_tpot_median_ape_pct"] = float(words[words.index("TPOT") + 3].rstrip("%,"))
    return out


def _write(engine: str, fitted: dict[str, float]) -> None:
    """Merge one engine's fitted constants into engine_calibration.yaml, its residual in the header."""
    existing = yaml.safe_load(OUTPUT.read_text()) if OUTPUT.exists() else {}
    existing = existing or {}
    notes = {}
    for line in OUTPUT.read_text().splitlines() if OUTPUT.exists() else []:
        if line.startswith("# ") and ": " in line and "training rows" in line:
            name = line[2:].split(":", 1)[0]
            notes[name] = line
    existing[engine] = {k: v for k, v in fitted.items() if k in (*PARAMS, "request_overhead_s")}
    notes[engine] = (
        f"# {engine}: {fitted['train_rows']:.0f} training rows, "
        f"TPOT median error {fitted['train_tpot_median_ape_pct']}%, "
        f"TTFT median error {fitted['train_ttft_median_ape_pct']}% (C <= {LOW_LOAD_CONCURRENCY}, full client protocol)"
    )
    header = (
        f"# Engine CPU constants fitted by `python -m bench.fit_engines` on {datetime.date.today().isoformat()}\n"
        f"# on the collocated e2e rows of the training models {', '.join(sorted(TRAIN_MODELS))}\n"
        "# (split by model; the other models are held out, see bench/RESULTS.md).\n"
        "# Merged over the engines.yaml entries of the same name.\n"
    )
    header += "".join(notes[name] + "\n" for name in sorted(notes))
    OUTPUT.write_text(header + yaml.safe_dump(existing, sort_keys=True))
    print(f"wrote {engine} to {OUTPUT}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
