"""The joint fleet solve alone, at scale: bench.fleet_scale's fleet from recorded candidate searches, by size.

Usage: python -m bench.fleet_solve_scale --searches SEARCHES.json

SEARCHES.json is what `python -m bench.fleet_searches --out` wrote (every class's goodput per instance and layout),
so no search runs here: each row is one `plan_fleet` of the benchmark fleet (200 or 500 deployments) with those
answers, with one rate per deployment or a 24-hour profile (its rate times a daily wave, 30-100%, seeded), mixed
instances or one strategy per deployment (`mix_instances`), on 4000 H100 SXM + 4000 B200 at catalog prices or
with B200 scarce (a third of what the mixed plan of the one-rate fleet uses). plan_s is the whole `plan_fleet`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

from bench.fleet_scale import make_fleet
from service.catalog.loader import load_catalog
from service.placement.fleet_candidates import CandidateTask, candidate_tasks
from service.placement.fleet_plan import parse_fleet_spec, plan_fleet


def recorded_searches(path: Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Options per (class, GPU type), as a candidate search reports them, from a bench.fleet_searches file."""
    rows = json.loads(path.read_text())
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        options = []
        for strategy, goodput in row["goodput_per_instance_rps"].items():
            tp = int(strategy.removeprefix("tp"))
            options.append(
                {
                    "strategy": strategy,
                    "tp": tp,
                    "pp": 1,
                    "attention_dp": 1,
                    "moe_ep": 1,
                    "gpus_per_instance": tp,
                    "goodput_per_instance_rps": goodput,
                    "ttft_ms": None,
                    "tpot_ms": None,
                }
            )
        out[(row["class"], row["gpu_type"])] = options
    return out


def class_of(spec: dict[str, Any]) -> str:
    """The class label bench.fleet_searches gives a search spec."""
    slo = spec["slo"]
    return f"{spec['model']} isl {spec['workload']['isl']} SLO {slo['ttft_ms']:g}/{slo['tpot_ms']:g} ms"


def with_profiles(fleet: dict[str, Any], periods: int, seed: int = 5) -> dict[str, Any]:
    """The fleet with each deployment's rate turned into a daily wave of ``periods`` hours (30-100% of it)."""
    rng = random.Random(seed)
    out: dict[str, Any] = json.loads(json.dumps(fleet))
    for d in out["deployments"]:
        rate = d["workload"].pop("rate")
        phase = rng.random() * 6
        d["rate_profile"] = [
            round(rate * (0.3 + 0.35 * (1 + math.sin(2 * math.pi * (h + phase) / periods))), 2) for h in range(periods)
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--searches", type=Path, required=True)
    args = parser.parse_args()
    catalog = load_catalog()
    answers = recorded_searches(args.searches)

    def searches(tasks: list[CandidateTask], done: Any) -> dict[str, dict[str, Any]]:
        return {t.key: {"gpu_type": t.gpu_type, "options": answers[(class_of(t.spec), t.gpu_type)]} for t in tasks}

    print(f"# {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    columns = "deployments | periods | fleet | mix_instances | cost_per_hour_usd | greedy_cost_per_hour_usd | mip_gap"
    print(f"| {columns} | solve_s | plan_s | mixed | unmet |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for count, periods in ((200, 1), (200, 24), (500, 24)):
        base = make_fleet(count)
        fleet = base if periods == 1 else with_profiles(base, periods)
        # Every class of these fleets is one of the 36 recorded.
        deployments = [d.model_dump(mode="json", exclude_none=True) for d in parse_fleet_spec(fleet).deployments]
        tasks, _ = candidate_tasks([(d, ["b200", "h100-sxm"]) for d in deployments], catalog=catalog)
        assert all((class_of(t.spec), t.gpu_type) in answers for t in tasks)
        label, spec = "catalog prices", fleet
        for run in range(4):
            mix = run % 2 == 0
            started = time.perf_counter()
            result = plan_fleet(
                parse_fleet_spec({**spec, "mix_instances": mix}), catalog=catalog, run_searches=searches
            )
            plan_s = time.perf_counter() - started
            solver = result["solver"]
            print(
                f"| {count} | {periods} | {label} | {str(mix).lower()} | {result['cost_per_hour_usd']:.2f} | "
                f"{result['greedy']['cost_per_hour_usd']:.2f} | {solver['mip_gap']:.2e} | {solver['solve_s']:.2f} | "
                f"{plan_s:.2f} | {sum(1 for d in result['deployments'] if d['mixed'])} | {len(result['unmet'])} |",
                flush=True,
            )
            if run == 0:
                scarce = max(1, result["gpus_used_by_type"]["b200"] // 3)
            if run == 1:
                label, spec = f"B200 scarce ({scarce})", {**fleet, "gpus": {"h100-sxm": 4000, "b200": scarce}}
    print(f"# load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
