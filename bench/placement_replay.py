"""Replay seeded cold starts on a simulated cluster under three placement policies; time place() on a big cluster.

Usage: python bench/placement_replay.py [--seed N] [--cold-starts N] [--servers N] [--sync-interval-s S]
                                        [--latency-calls N]
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
from service.placement.cluster import Cluster
from service.placement.optimizer import PlacementRequest, place
from service.placement.replay import REPLAY_MODELS, ReplayConfig, run_replay, synthetic_cluster
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
    """Run the replay and the latency measurement, print markdown."""
    defaults = ReplayConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--cold-starts", type=int, default=defaults.cold_starts)
    parser.add_argument("--servers", type=int, default=defaults.servers)
    parser.add_argument("--sync-interval-s", type=float, default=defaults.sync_interval_s)
    parser.add_argument("--latency-calls", type=int, default=300, help="place() calls to time (0 to skip)")
    args = parser.parse_args()
    config = replace(
        defaults,
        seed=args.seed,
        cold_starts=args.cold_starts,
        servers=args.servers,
        sync_interval_s=args.sync_interval_s,
    )
    catalog = default_catalog()
    print(f"Command: `{' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}`\n")
    print(
        f"Cluster: {config.servers} servers x {config.gpus_per_server} {config.gpu_type}, DRAM "
        f"{config.dram_bytes / 1e9:.0f} GB, SSD {config.ssd_bytes / 1e12:.0f} TB at "
        f"{config.ssd_read_bytes_per_s / 1e9:.0f} GB/s nominal ({config.degraded_ssd_share:.0%} of servers degraded), "
        f"PCIe {config.pcie_bytes_per_s / 1e9:.0f} GB/s per GPU, network "
        f"{'/'.join(f'{g:g}' for g in config.network_gbit_per_s)} Gbit/s per server, remote store "
        f"{config.remote_store_bytes_per_s / 1e9:.1f} GB/s shared. {len(REPLAY_MODELS)} catalog models x "
        f"{config.variants_per_model} fine-tuned variants, Zipf {config.zipf_exponent}; {config.cold_starts} cold "
        f"starts (Poisson, target utilization {config.utilization:.0%}, mean lifetime {config.mean_lifetime_s:.0f} s); "
        f"placer state synced every {config.sync_interval_s:g} s; seed {config.seed}.\n"
    )
    start = time.perf_counter()
    result = run_replay(config, catalog=catalog)
    replay_s = time.perf_counter() - start
    print("Startup latency (arrival to instance ready):\n")
    print(result.markdown())
    print(f"\nReplay time: {replay_s:.1f} s for {len(result.results)} policies.")
    if args.latency_calls > 0:
        latency = placement_latency_ms(catalog, calls=args.latency_calls, seed=args.seed)
        print(f"\nplace() latency, 64 servers / 512 GPUs / 200 instances, {args.latency_calls} calls:\n")
        print("| garbage collector | p50 (ms) | p99 (ms) |")
        print("|---|---:|---:|")
        for label in ("gc on", "gc paused"):
            print(f"| {label} | {latency[f'{label} p50']:.2f} | {latency[f'{label} p99']:.2f} |")


if __name__ == "__main__":
    main()
