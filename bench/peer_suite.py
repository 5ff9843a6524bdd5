"""Score `splan estimate` on the peer suite's real vLLM runs (../shared/reference/peer_suite) beside six peers.

Usage: python bench/peer_suite.py [--reference DIR] [--requests N]
Each load stage is estimated with the run's engine knobs (max_num_batched_tokens, max_num_seqs), constant-rate
arrivals at the stage's rate, and the stage's mean prompt and output lengths. Prefix caching of the shared
system prompts is not modelled (the prompts here share 100–150 of ~600 tokens).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from bench.e2e_accuracy import ape, default_reference_dir, pct
from service.catalog.loader import default_catalog
from service.planning.estimate import EstimateRequest, run_estimate

MODELS = {
    "meta-llama/Llama-2-7b-hf": "llama-2-7b",
    "meta-llama/Llama-2-70b-hf": "llama-2-70b",
    "mistralai/Mixtral-8x7B-v0.1": "mixtral-8x7b",
    "codellama/CodeLlama-34b-Instruct-hf": "codellama-34b",
}
METRICS = {
    "ttft_mean": ("ttft_mean_ms", "ttft_ms", "mean"),
    "ttft_p90": ("ttft_p90_ms", "ttft_ms", "p90"),
    "ttft_p99": ("ttft_p99_ms", "ttft_ms", "p99"),
    "itl_mean": ("itl_mean_ms", "tpot_ms", "mean"),
    "e2e_mean": ("e2e_mean_ms", "e2e_ms", "mean"),
}
PEER_METRICS = {"ttft_mean": "ttft_mean", "ttft_p90": "ttft_p90", "ttft_p99": "ttft_p99", "itl_mean": "itl_mean"}


def main() -> int:
    """Estimate every load stage and print median absolute % error per metric, ours beside the peers'."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reference", type=Path, default=default_reference_dir())
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--engine", default="vllm", help="catalog engine to model the runs with")
    args = parser.parse_args()
    suite = args.reference / "peer_suite"
    runs = [r for r in csv.DictReader((suite / "vllm_h100_runs.csv").open()) if int(r["stage"]) >= 0]
    catalog = default_catalog()
    errors: dict[str, list[float]] = defaultdict(list)
    overloaded: dict[str, list[float]] = defaultdict(list)
    started = time.perf_counter()
    print(f"{'experiment':44s} {'rate':>5s} {'TTFT':>9s} {'pred':>9s} {'E2E':>9s} {'pred':>9s}")
    for run in runs:
        rate = float(run["rate_req_s"])
        count = min(args.requests, int(rate * float(run["duration_s"])))
        request = EstimateRequest(
            model=MODELS[run["model"]],
            gpu="h100-sxm",
            engine=args.engine,
            weight_dtype="bf16",
            tp=int(run["tp"]),
            isl=round(float(run["prompt_len_mean"])),
            osl=round(float(run["output_len_mean"])),
            rate=rate,
            arrival="constant",
            requests=count,
            max_batched_tokens=int(run["max_num_batched_tokens"]),
            max_sequences=int(run["max_num_seqs"]),
        )
        out = run_estimate(request, catalog=catalog).as_dict()
        bucket = overloaded if run["workload"] == "reasoning" else errors
        for metric, (column, key, stat) in METRICS.items():
            bucket[metric].append(ape(out[key][stat], float(run[column])))
        print(
            f"{run['experiment'][-44:]:44s} {rate:5.1f} {float(run['ttft_mean_ms']):9.1f} "
            f"{out['ttft_ms']['mean']:9.1f} {float(run['e2e_mean_ms']):9.1f} {out['e2e_ms']['mean']:9.1f}"
        )
    elapsed = time.perf_counter() - started
    peers: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in csv.DictReader((suite / "simulator_errors.csv").open()):
        peers[row["simulator"]][row["metric_name"]].append(float(row["mape"]))
    print()
    header = "| simulator | " + " | ".join(METRICS) + " |"
    print(header)
    print("|---|" + "---:|" * len(METRICS))
    ours = " | ".join(f"{statistics.median(errors[m]):.1f} (p90 {pct(errors[m], 90):.0f})" for m in METRICS)
    print(f"| **splan** ({len(errors['ttft_mean'])} stages) | {ours} |")
    hot = " | ".join(f"{statistics.median(overloaded[m]):.1f}" for m in METRICS) if overloaded else ""
    if hot:
        print(f"| splan, overloaded `reasoning` stages ({len(overloaded['ttft_mean'])}) | {hot} |")
    for name in sorted(peers):
        cells = []
        for metric in METRICS:
            values = peers[name].get(PEER_METRICS.get(metric, metric), [])
            cells.append(f"{statistics.median(values):.1f}" if values else "–")
        print(f"| {name} (all its rows) | " + " | ".join(cells) + " |")
    print(f"\n{len(runs)} stages in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
