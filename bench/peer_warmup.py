"""How much of each peer-suite run's first-minute TTFT excess the cold prefix cache explains.

Usage: python -m bench.peer_warmup [--reference DIR]

Per served load stage: TTFT mean - median, and that excess times the stage's requests spread over its first round of
N uncached prompts (ms per cold prompt; warm stages at 5-10 req/s have mean = median). For each first stage, the
simulated cost of a cold prompt: TTFT p50 with the prefix cache off minus on over the stage's first 300 requests.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import replace
from pathlib import Path

from bench.e2e_accuracy import default_reference_dir
from bench.peer_suite import stage_request
from service.catalog.loader import default_catalog
from service.planning.estimate import EstimateRequest, run_estimate
from service.planning.trace import Trace
from service.planning.user_calibration import prompt_pool_size

# Requests of each first stage simulated for the cold-prompt cost (its first round and a few warm rounds).
SIMULATED_REQUESTS = 300


def cut_trace(request: EstimateRequest, count: int) -> EstimateRequest:
    """``request`` with a replayed trace cut to its first ``count`` requests (else itself)."""
    trace = request.trace
    if trace is None:
        return request
    if isinstance(trace, Trace):
        if trace.size <= count:
            return request
        k = slice(0, count)
        cut = replace(
            trace,
            arrival_s=trace.arrival_s[k],
            input_tokens=trace.input_tokens[k],
            output_tokens=trace.output_tokens[k],
            prefix_group=trace.prefix_group[k],
            shared_tokens=trace.shared_tokens[k],
            cacheable_tokens=trace.cacheable_tokens[k],
        )
        return replace(request, trace=cut)
    records = list(trace)
    if len(records) <= count:
        return request
    return replace(request, trace=records[:count])


def main() -> int:
    """Print one line per served stage."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=default_reference_dir())
    args = parser.parse_args()
    catalog = default_catalog()
    path = args.reference / "peer_suite" / "vllm_h100_runs.csv"
    for run in csv.DictReader(path.open()):
        if int(run["stage"]) < 0 or run["workload"] == "reasoning":
            continue
        requests, prompts = int(run["n_success"]), prompt_pool_size(run)
        skew_ms = float(run["ttft_mean_ms"]) - float(run["ttft_median_ms"])
        line = (
            f"{run['experiment'][-38:]:38s} stage {run['stage']} {float(run['rate_req_s']):4.0f} req/s "
            f"n={requests:5d} N={prompts} mean-median {skew_ms:6.2f} ms, "
            f"per cold prompt {skew_ms * requests / prompts:6.0f} ms"
        )
        if run["stage"] == "0":
            request = cut_trace(stage_request(run), SIMULATED_REQUESTS)
            warm = run_estimate(request, catalog=catalog).result.ttft.p50
            cold = run_estimate(replace(request, prefix_caching=False), catalog=catalog).result.ttft.p50
            line += f"; simulated cold - warm p50 {cold - warm:5.1f} ms"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
