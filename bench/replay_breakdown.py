"""Where the placement replay's startup seconds go, and what a tighter keep-alive budget buys.

Usage: python -m bench.replay_breakdown [--seeds 0,1,2,3,4] [--rate 2] [--scenario stated] [--state-idle-rates]
                                        [--window-s 75] [--policies serverlessllm,ours+prewarm] [--budgets 45,55]

Part 1, per seed and policy (default ServerlessLLM-style and ours+prewarm): startup seconds in all, those of the
requests that arrive in the first ``--window-s`` seconds (the cluster starts with empty DRAM), loads and startup
seconds by tier, idle instances stopped by the placer, cold starts of a checkpoint within the keep-alive of an
idle stop of that checkpoint (a request the stopped instance would have served warm), GPU-hours and prewarming
copies.

Part 2, with ``--budgets``: ours+prewarm with the prewarming advice's keep-alive budgeted as the idle GPU-seconds of
a uniform keep-alive of B seconds (bounds 5 s to the replay's keep-alive), so that the advice shortens the
keep-alive of the checkpoints whose idle time buys least (``ReplayConfig.prewarm_budget_keep_alive_s``); mean, p99
and GPU-hours against the ServerlessLLM-style policy, averaged over the seeds.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

import numpy as np

from service.catalog.loader import default_catalog
from service.placement import replay
from service.planning.catalog import Catalog

POLICIES = (replay.Policy.SERVERLESSLLM, replay.Policy.OURS_PREWARM)


class _CountingSimulation(replay._Simulation):
    """The replay's simulation, counting idle stops and the cold starts that follow them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_stop_s: dict[int, float] = {}
        self.after_stop = 0

    def remove(self, inst: replay._Instance, time_s: float) -> None:
        idle_since_s = inst.idle_since_s
        if idle_since_s is not None and time_s - idle_since_s < inst.keep_alive_s - 1e-9:
            self.last_stop_s[inst.checkpoint] = time_s
        super().remove(inst, time_s)

    def cold_start(self, request: int, time_s: float) -> bool:
        checkpoint = int(self.trace.checkpoint_index[request])
        started = super().cold_start(request, time_s)
        stopped_s = self.last_stop_s.get(checkpoint)
        if started and stopped_s is not None and time_s - stopped_s < self.config.keep_alive_s:
            self.after_stop += 1
        return started


def breakdown(
    config: replay.ReplayConfig, catalog: Catalog, window_s: float, policies: tuple[replay.Policy, ...]
) -> list[str]:
    """One markdown row per policy for one seed."""
    trace = replay.make_trace(config, catalog=catalog)
    early = trace.arrival_s < window_s
    rows = []
    for policy in policies:
        sim = _CountingSimulation(config, trace, policy, catalog)
        result = sim.run()
        startup = np.asarray(result.startup_s)
        tiers = " / ".join(
            f"{result.tiers.get(t, 0)}: {result.startup_s_by_tier.get(t, 0.0):.0f}" for t in ("dram", "ssd", "remote")
        )
        rows.append(
            f"| {config.seed} | {policy.value} | {startup.sum():.0f} | {startup[early].sum():.0f} "
            f"({startup[early].sum() / max(startup.sum(), 1e-9) * 100:.0f}%) | {result.cold_starts} | {tiers} | "
            f"{result.stopped_idle} | {sim.after_stop} | {result.gpu_seconds / 3600:.1f} | "
            f"{result.copied_bytes / 1e12:.2f} |"
        )
    return rows


def budget_row(config: replay.ReplayConfig, catalog: Catalog, seeds: list[int], budget_s: float) -> str:
    """Seed-averaged ratios of ours+prewarm to the ServerlessLLM-style policy under one keep-alive budget."""
    means: dict[replay.Policy, list[tuple[float, float, float]]] = {p: [] for p in POLICIES}
    budgeted = replace(config, prewarm_budget_keep_alive_s=budget_s, prewarm_min_keep_alive_s=5.0)
    for seed in seeds:
        result = replay.run_replay(replace(budgeted, seed=seed), catalog=catalog, policies=POLICIES)
        for policy in POLICIES:
            r = result.result(policy)
            means[policy].append((r.mean_s, r.percentile_s(99), r.gpu_seconds / 3600))
    base, ours = (np.mean(means[p], axis=0) for p in POLICIES)
    return (
        f"| {budget_s:g} s | {base[0]:.3f} | {ours[0]:.3f} | {ours[0] / base[0]:.2f}x | {base[1]:.2f} | "
        f"{ours[1]:.2f} | {ours[1] / base[1]:.2f}x | {base[2]:.1f} | {ours[2]:.1f} | {ours[2] / base[2]:.2f}x |"
    )


def main() -> None:
    """Print part 1 for every seed, then part 2 for every budget."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default: 0,1,2,3,4)")
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second (default: 2)")
    parser.add_argument("--scenario", default="stated", help="stated or degraded (default: stated)")
    parser.add_argument("--window-s", type=float, default=75.0, help="the first seconds reported apart (default: 75)")
    parser.add_argument(
        "--state-idle-rates", action="store_true", help="idle instances state their rates (default: off)"
    )
    parser.add_argument(
        "--policies",
        default=",".join(p.value for p in POLICIES),
        help="comma-separated policies of part 1 (default: serverlessllm,ours+prewarm)",
    )
    parser.add_argument("--budgets", default="", help="comma-separated keep-alive budgets in s (default: none)")
    args = parser.parse_args()
    seeds = [int(x) for x in args.seeds.split(",") if x]
    catalog = default_catalog()
    config = replace(
        replay.ReplayConfig(),
        rate_per_s=args.rate,
        scenario=replay.Scenario(args.scenario),
        state_idle_rates=args.state_idle_rates,
    )
    print(
        f"| seed | policy | startup s | of which first {args.window_s:g} s | cold starts | "
        "loads: startup s (dram / ssd / remote) | idle stopped | cold starts after an idle stop | GPU-hours | "
        "copied TB |"
    )
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|")
    policies = tuple(replay.Policy(x) for x in args.policies.split(",") if x)
    for seed in seeds:
        for row in breakdown(replace(config, seed=seed), catalog, args.window_s, policies):
            print(row)
    budgets = [float(x) for x in args.budgets.split(",") if x]
    if budgets:
        print(
            "\n| keep-alive budget | SLLM mean (s) | ours+prewarm mean (s) | mean vs SLLM | SLLM p99 (s) | "
            "ours+prewarm p99 (s) | p99 vs SLLM | SLLM GPU-h | ours+prewarm GPU-h | GPU-h vs SLLM |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for budget_s in budgets:
            print(budget_row(config, catalog, seeds, budget_s))


if __name__ == "__main__":
    main()
