"""Score `splan estimate` on the peer suite's real vLLM runs (../shared/reference/peer_suite) beside six peers.

Usage: python -m bench.peer_suite [--reference DIR] [--seeds N] [--engine E]

Each load stage is simulated as its client ran it. The runs come from inference-perf (kubernetes-sigs/inference-perf;
the columns are its `shared_prefix` config, the experiments date from 2026-02-17/18, its commit 4ad7d4b of
2026-02-14 is cited): its `constant` load type draws exponential gaps normalised to the stage duration
(loadgen/load_timer.py ConstantLoadTimer), i.e. Poisson arrivals; its data are num_groups x num_prompts_per_group
fixed prompts that request k takes in turn (k mod N, restarting each stage), so after the first round every prompt
is a repeat that vLLM's prefix cache (on in these runs) serves whole; `ignore_eos: true` with max_tokens =
output_len makes every answer output_len_target tokens long (the runs' output_len_mean is the client's re-count of
the answer text, 193 for 247 generated on Llama-2-7B: (E2E - TTFT) / (2 x ITL mean) gives 247). Lengths are exact
(the config's distributions have std 0); the prompt is the measured mean length. Predictions are means over
`--seeds` arrival draws. The same row -> request mapping serves `splan calibrate` (bench/calibrate_user.py).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.e2e_accuracy import ape, default_reference_dir, pct
from service.catalog.loader import default_catalog
from service.planning.catalog import Catalog
from service.planning.estimate import EstimateRequest, run_estimate
from service.planning.user_calibration import catalog_model_name, predicted_metrics, request_for_benchmark_row

GPU = "h100-sxm"
# Metric -> measured column; the prediction of the same name comes from predicted_stage().
METRICS = {
    "ttft_mean": "ttft_mean_ms",
    "ttft_p90": "ttft_p90_ms",
    "ttft_p99": "ttft_p99_ms",
    "itl_mean": "itl_mean_ms",
    "tpot_e2e": "",
    "e2e_mean": "e2e_mean_ms",
    "e2e_median": "e2e_median_ms",
}
PEER_METRICS = {"ttft_mean": "ttft_mean", "ttft_p90": "ttft_p90", "ttft_p99": "ttft_p99", "itl_mean": "itl_mean"}


def output_tokens(run: Mapping[str, str]) -> int:
    """Tokens each answer had: the requested output length, generated whole (ignore_eos)."""
    return int(float(run["output_len_target"]))


def peer_row(run: Mapping[str, str]) -> dict[str, str]:
    """One load stage as the benchmark row `splan calibrate` reads: the load, the client's prompts, the latencies."""
    return {
        "model": catalog_model_name(run["model"]),
        "backend": "vllm",
        "tp": run["tp"],
        "rate": run["rate_req_s"],
        # inference-perf's `constant` rate is Poisson arrivals (see the module docstring).
        "arrival": "poisson",
        "duration_s": run["duration_s"],
        "num_unique_system_prompts": run["num_unique_system_prompts"],
        "users_per_system_prompt": run["users_per_system_prompt"],
        "isl": run["prompt_len_mean"],
        "osl": str(output_tokens(run)),
        "max_num_batched_tokens": run["max_num_batched_tokens"],
        "max_num_seqs": run["max_num_seqs"],
        # Stages after the first run on the same server, which served the same prompts in the stage before.
        "prefix_cache_warm": "1" if int(run["stage"]) > 0 else "0",
        "ttft_ms": run["ttft_mean_ms"],
        "ttft_p90_ms": run["ttft_p90_ms"],
        "ttft_p99_ms": run["ttft_p99_ms"],
        "e2e_ms": run["e2e_mean_ms"],
        "e2e_p50_ms": run["e2e_median_ms"],
    }


def stage_request(run: Mapping[str, str], *, engine: str = "vllm", seed: int = 0) -> EstimateRequest:
    """The estimate request that replays one load stage (arrivals drawn from ``seed``)."""
    return request_for_benchmark_row(peer_row(run), gpu=GPU, engine=engine, defaults={"seed": seed})


def measured(run: Mapping[str, str]) -> dict[str, float]:
    """Measured metrics of a stage (ms); tpot_e2e is (E2E - TTFT) mean over the output tokens after the first."""
    out = {metric: float(run[column]) for metric, column in METRICS.items() if column}
    out["tpot_e2e"] = (out["e2e_mean"] - out["ttft_mean"]) / (output_tokens(run) - 1)
    return out


def predicted_stage(
    run: Mapping[str, str],
    *,
    catalog: Catalog,
    seeds: int,
    engine: str = "vllm",
    profile: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Predicted metrics of a stage, the mean over ``seeds`` arrival draws (itl_mean: predicted TPOT)."""
    draws = []
    for seed in range(seeds):
        request = stage_request(run, engine=engine, seed=seed)
        if profile is not None:
            request = replace(request, profile=profile)
        draws.append(predicted_metrics(run_estimate(request, catalog=catalog).result))
    mean = {key: statistics.fmean(d[key] for d in draws) for key in draws[0]}
    return {
        "ttft_mean": mean["ttft_mean"],
        "ttft_p90": mean["ttft_p90"],
        "ttft_p99": mean["ttft_p99"],
        "itl_mean": mean["tpot_mean"],
        "tpot_e2e": mean["tpot_mean"],
        "e2e_mean": mean["e2e_mean"],
        "e2e_median": mean["e2e_p50"],
        "ttft_p99_spread": max(d["ttft_p99"] for d in draws) - min(d["ttft_p99"] for d in draws),
    }


def chunks_per_token(run: Mapping[str, str]) -> float:
    """Streamed messages per output token that the ITL column implies: (E2E - TTFT) / ITL mean / tokens."""
    return (float(run["e2e_mean_ms"]) - float(run["ttft_mean_ms"])) / float(run["itl_mean_ms"]) / output_tokens(run)


def main() -> int:
    """Estimate every load stage and print median absolute % error per metric, ours beside the peers'."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=default_reference_dir())
    parser.add_argument("--seeds", type=int, default=3, help="arrival draws averaged per stage")
    parser.add_argument("--engine", default="vllm", help="catalog engine to model the runs with")
    args = parser.parse_args()
    suite = args.reference / "peer_suite"
    runs = [r for r in csv.DictReader((suite / "vllm_h100_runs.csv").open()) if int(r["stage"]) >= 0]
    catalog = default_catalog()
    errors: dict[str, list[float]] = defaultdict(list)
    overloaded: dict[str, list[float]] = defaultdict(list)
    started = time.perf_counter()
    print(
        f"{'experiment':44s} {'rate':>5s} {'TTFT':>7s} {'pred':>7s} {'p90':>7s} {'pred':>7s} {'p99':>7s} "
        f"{'pred':>7s} {'±seeds':>6s} {'E2E p50':>8s} {'pred':>8s} {'TPOT':>6s} {'pred':>6s} {'msg/tok':>7s}"
    )
    for run in runs:
        meas = measured(run)
        pred = predicted_stage(run, catalog=catalog, seeds=args.seeds, engine=args.engine)
        bucket = overloaded if run["workload"] == "reasoning" else errors
        for metric in METRICS:
            bucket[metric].append(ape(pred[metric], meas[metric]))
        print(
            f"{run['experiment'][-44:]:44s} {float(run['rate_req_s']):5.1f} {meas['ttft_mean']:7.1f} "
            f"{pred['ttft_mean']:7.1f} {meas['ttft_p90']:7.1f} {pred['ttft_p90']:7.1f} {meas['ttft_p99']:7.1f} "
            f"{pred['ttft_p99']:7.1f} {pred['ttft_p99_spread']:6.1f} {meas['e2e_median']:8.0f} "
            f"{pred['e2e_median']:8.0f} {meas['tpot_e2e']:6.2f} {pred['tpot_e2e']:6.2f} {chunks_per_token(run):7.2f}",
            flush=True,
        )
    elapsed = time.perf_counter() - started
    peers: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in csv.DictReader((suite / "simulator_errors.csv").open()):
        peers[row["simulator"]][row["metric_name"]].append(float(row["mape"]))
    print()
    print("| simulator | " + " | ".join(METRICS) + " |")
    print("|---|" + "---:|" * len(METRICS))
    ours = " | ".join(f"{statistics.median(errors[m]):.1f} (p90 {pct(errors[m], 90):.0f})" for m in METRICS)
    print(f"| **splan** ({len(errors['ttft_mean'])} stages) | {ours} |")
    if overloaded:
        hot = " | ".join(f"{statistics.median(overloaded[m]):.1f}" for m in METRICS)
        print(f"| splan, overloaded `reasoning` stages ({len(overloaded['ttft_mean'])}) | {hot} |")
    for name in sorted(peers):
        cells = []
        for metric in METRICS:
            values = peers[name].get(PEER_METRICS.get(metric, metric), [])
            cells.append(f"{statistics.median(values):.1f}" if values else "–")
        print(f"| {name} (all its rows) | " + " | ".join(cells) + " |")
    print(f"\n{len(runs)} stages x {args.seeds} seeds in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
