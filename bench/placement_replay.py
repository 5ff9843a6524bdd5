"""Fair placement replay: seeded requests with cold starts, keep-alive and warm reuse on a simulated cluster,
every policy seeing the same state (see service/placement/replay.py); time place() on a big cluster.

Usage: python -m bench.placement_replay [--seeds 0,1,2,3,4] [--rates 1,2,4] [--scenarios stated,degraded]
                                        [--duration-s 3600] [--servers 16] [--keep-alive-s 60] [--latency-calls N]
                                        [--state-idle-rates]
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
import time
from dataclasses import replace

import numpy as np

from service.catalog.loader import default_catalog
from service.placement.cluster import Cluster, TierKind
from service.placement.optimizer import PlacementRequest, place
from service.placement.replay import REPLAY_MODELS, Policy, ReplayConfig, Scenario, run_replay, synthetic_cluster
from service.planning.catalog import Catalog


def placement_latency_ms(catalog: Catalog, *, calls: int, seed: int) -> dict[str, float]:
    """p50/p99 of place() on a 64-server / 512-GPU / 200-instance cluster, each call on a freshly parsed cluster
    (so per-cluster indexes are rebuilt every time, as in the API); with and without the garbage collector."""
    data = synthetic_cluster(catalog=catalog, servers=64, gpus_per_server=8, instances=200, seed=seed).model_dump()
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(calls):
        name, tp = REPLAY_MODELS[int(rng.integers(len(REPLAY_MODELS)))]
        requests.append(PlacementRequest(model=name, tp=tp, checkpoint=f"{name}@ft{int(rng.integers(16))}"))
    out: dict[str, float] = {}
    for label, collect in (("gc on", True), ("gc paused", False)):
        timings = []
        # The first pass warms the per-process caches (derived migration costs); the second is measured.
        for measured in (False, True):
            for request in requests:
                cluster = Cluster.model_validate(data)
                if not collect:
                    gc.disable()
                start = time.perf_counter()
                place(cluster, request, now_s=0.0, catalog=catalog)
                elapsed = time.perf_counter() - start
                gc.enable()
                if measured:
                    timings.append(elapsed * 1e3)
        out[f"{label} p50"] = float(np.percentile(timings, 50))
        out[f"{label} p99"] = float(np.percentile(timings, 99))
    return out


def main() -> None:
    """Run the replay over seeds, rates and scenarios, print one table per scenario and rate, and time place()."""
    defaults = ReplayConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    parser.add_argument("--rates", default="1,2,4", help="comma-separated request rates (req/s)")
    parser.add_argument("--scenarios", default="stated,degraded", help="stated and/or degraded")
    parser.add_argument("--duration-s", type=float, default=defaults.duration_s)
    parser.add_argument("--servers", type=int, default=defaults.servers)
    parser.add_argument("--keep-alive-s", type=float, default=defaults.keep_alive_s)
    parser.add_argument(
        "--state-idle-rates",
        action="store_true",
        help="idle instances state their request rate and keep-alive, so the optimizer prices stopping them "
        "(default: off)",
    )
    parser.add_argument("--latency-calls", type=int, default=300, help="place() calls to time (0 to skip)")
    parser.add_argument(
        "--policies",
        default="serverlessllm,ours,serverlessllm+prewarm,ours+prewarm",
        help=f"comma-separated, of {', '.join(p.value for p in Policy)}; serverlessllm is the baseline",
    )
    args = parser.parse_args()
    seeds = [int(x) for x in args.seeds.split(",") if x]
    rates = [float(x) for x in args.rates.split(",") if x]
    scenarios = [Scenario(x) for x in args.scenarios.split(",") if x]
    policies = tuple(dict.fromkeys([Policy.SERVERLESSLLM, *(Policy(x) for x in args.policies.split(",") if x)]))
    catalog = default_catalog()
    print(f"Command: `{' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}`\n")
    config = replace(
        defaults,
        servers=args.servers,
        duration_s=args.duration_s,
        keep_alive_s=args.keep_alive_s,
        state_idle_rates=args.state_idle_rates,
    )
    print(
        f"Cluster: {config.servers} servers x {config.gpus_per_server} {config.gpu_type}, DRAM "
        f"{config.dram_bytes / 1e9:.0f} GB, SSD {config.ssd_bytes / 1e12:.0f} TB at "
        f"{config.ssd_read_bytes_per_s / 1e9:.0f} GB/s stated, PCIe {config.pcie_bytes_per_s / 1e9:.0f} GB/s per GPU, "
        f"network {'/'.join(f'{g:g}' for g in config.network_gbit_per_s)} Gbit/s per server. {config.checkpoints} "
        f"checkpoints of {len(REPLAY_MODELS)} catalog models (7-72B), Zipf {config.zipf_exponent}; Poisson requests "
        f"for {config.duration_s:g} s, up to {config.max_requests_per_instance} per instance, keep-alive "
        f"{config.keep_alive_s:g} s; seeds {seeds}; idle instances state their request rates: "
        f"{'yes' if config.state_idle_rates else 'no'}. Every column is the mean over the seeds.\n"
    )
    started = time.perf_counter()
    for scenario in scenarios:
        for rate in rates:
            results = [
                run_replay(
                    replace(config, seed=seed, rate_per_s=rate, scenario=scenario), catalog=catalog, policies=policies
                )
                for seed in seeds
            ]
            print(f"### {scenario.value} bandwidths, {rate:g} req/s\n")
            print(
                "| policy | requests | cold starts | mean startup (s) | p50 (s) | p99 (s) | GPU-hours | mean vs SLLM | "
                "p99 vs SLLM | GPU-h vs SLLM | dram / ssd / remote loads | startup s from dram / ssd / remote | "
                "migrations | staged | idle stopped | copied TB | estimate error (s) |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|")
            rows: dict[Policy, dict[str, float]] = {}
            labels: dict[Policy, tuple[str, str]] = {}
            for policy in policies:
                per_seed = [r.result(policy) for r in results]
                rows[policy] = {
                    "requests": float(np.mean([len(p.startup_s) for p in per_seed])),
                    "cold": float(np.mean([p.cold_starts for p in per_seed])),
                    "mean": float(np.mean([p.mean_s for p in per_seed])),
                    "p50": float(np.mean([p.percentile_s(50) for p in per_seed])),
                    "p99": float(np.mean([p.percentile_s(99) for p in per_seed])),
                    "gpuh": float(np.mean([p.gpu_seconds for p in per_seed])) / 3600,
                    "mig": float(np.mean([p.migrations for p in per_seed])),
                    "staged": float(np.mean([p.staged for p in per_seed])),
                    "stopped": float(np.mean([p.stopped_idle for p in per_seed])),
                    "err": float(np.mean([p.estimate_error_s for p in per_seed])),
                    "copied": float(np.mean([p.copied_bytes for p in per_seed])) / 1e12,
                }
                labels[policy] = (
                    " / ".join(f"{np.mean([p.tiers.get(t.value, 0) for p in per_seed]):.0f}" for t in TierKind),
                    " / ".join(
                        f"{np.mean([p.startup_s_by_tier.get(t.value, 0.0) for p in per_seed]):.0f}" for t in TierKind
                    ),
                )
            base = rows[Policy.SERVERLESSLLM]
            for policy, row in rows.items():
                print(
                    f"| {policy.value} | {row['requests']:.0f} | {row['cold']:.0f} | {row['mean']:.2f} | "
                    f"{row['p50']:.2f} | {row['p99']:.2f} | {row['gpuh']:.1f} | {_ratio(row['mean'], base['mean'])} | "
                    f"{_ratio(row['p99'], base['p99'])} | {_ratio(row['gpuh'], base['gpuh'])} | {labels[policy][0]} | "
                    f"{labels[policy][1]} | {row['mig']:.1f} | {row['staged']:.1f} | {row['stopped']:.1f} | "
                    f"{row['copied']:.2f} | {row['err']:.2f} |"
                )
            print()
    print(f"Replay time: {time.perf_counter() - started:.0f} s.")
    if args.latency_calls > 0:
        latency = placement_latency_ms(catalog, calls=args.latency_calls, seed=seeds[0])
        print(f"\nplace() latency, 64 servers / 512 GPUs / 200 instances, {args.latency_calls} calls:\n")
        print("| garbage collector | p50 (ms) | p99 (ms) |")
        print("|---|---:|---:|")
        for label in ("gc on", "gc paused"):
            print(f"| {label} | {latency[f'{label} p50']:.2f} | {latency[f'{label} p99']:.2f} |")


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base > 0 else "-"


if __name__ == "__main__":
    main()
