"""The candidate searches of the fleet benchmark, one by one: CPU seconds and per-instance goodput of each class.

Usage: python -m bench.fleet_searches [--out FILE.json] [--compare EARLIER.json]

Runs, in this process and one after another, the 36 candidate searches of `bench.fleet_scale`'s 200-deployment
fleet (18 classes x H100 SXM and B200), exactly as a fleet plan runs them, and prints per search its CPU time and
the goodput per instance of each layout it simulated. `--out` keeps the figures; `--compare` prints them beside an
earlier run's (another commit's), with the relative change of each goodput: a change of the search that is meant
to leave its answers alone must show none beyond the bisection tolerance (`SearchLimits.rate_tolerance`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

from bench.fleet_scale import make_fleet
from service.catalog.loader import load_catalog
from service.placement.fleet_candidates import candidate_tasks, run_candidate_search
from service.placement.fleet_plan import parse_fleet_spec
from service.planning.search import SearchLimits


def run_searches() -> list[dict[str, Any]]:
    """Each candidate search of the benchmark fleet: its class, GPU type, CPU seconds and goodputs per layout."""
    catalog = load_catalog()
    fleet = parse_fleet_spec(make_fleet(200))
    docs = [d.model_dump(mode="json", exclude_none=True) for d in fleet.deployments]
    tasks, _ = candidate_tasks([(d, sorted(fleet.gpus or {})) for d in docs], catalog=catalog)
    rows = []
    for task in tasks:
        spec = task.spec
        started = time.process_time()
        result = run_candidate_search(spec, catalog=catalog)
        cpu_s = time.process_time() - started
        slo = spec["slo"]
        rows.append(
            {
                "class": f"{spec['model']} isl {spec['workload']['isl']} SLO {slo['ttft_ms']:g}/{slo['tpot_ms']:g} ms",
                "gpu_type": task.gpu_type,
                "cpu_s": cpu_s,
                "goodput_per_instance_rps": {o["strategy"]: o["goodput_per_instance_rps"] for o in result["options"]},
            }
        )
        print(f"{rows[-1]['class']} on {task.gpu_type}: {cpu_s:.2f} s", flush=True)
    return rows


def print_table(rows: list[dict[str, Any]], earlier: list[dict[str, Any]] | None) -> None:
    """Markdown: per search its goodputs and CPU seconds (beside the earlier run's, with the change)."""
    tolerance = SearchLimits().rate_tolerance
    if earlier is None:
        print("| class | GPU type | goodput per instance (req/s) | cpu_s |")
        print("|---|---|---|---|")
        for r in rows:
            goodputs = "; ".join(f"{s} {g:.2f}" for s, g in r["goodput_per_instance_rps"].items())
            print(f"| {r['class']} | {r['gpu_type']} | {goodputs} | {r['cpu_s']:.2f} |")
        print(f"| all {len(rows)} | | | {sum(r['cpu_s'] for r in rows):.1f} |")
        return
    before = {(r["class"], r["gpu_type"]): r for r in earlier}
    worst = 0.0
    print("| class | GPU type | goodput per instance, earlier -> now (req/s) | change | cpu_s earlier | cpu_s now |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        old = before[(r["class"], r["gpu_type"])]
        cells, changes = [], []
        for strategy, was in old["goodput_per_instance_rps"].items():
            now = r["goodput_per_instance_rps"].get(strategy, 0.0)
            change = now / was - 1 if was > 0 else 0.0
            worst = max(worst, abs(change))
            cells.append(f"{strategy} {was:.2f} -> {now:.2f}")
            changes.append(f"{change:+.1%}")
        print(
            f"| {r['class']} | {r['gpu_type']} | {'; '.join(cells)} | {', '.join(changes)} | {old['cpu_s']:.2f} | "
            f"{r['cpu_s']:.2f} |"
        )
    total_before = sum(r["cpu_s"] for r in earlier)
    total_now = sum(r["cpu_s"] for r in rows)
    largest = f"largest {worst:.1%} (tolerance {tolerance:.0%})"
    print(f"| all {len(rows)} | | | {largest} | {total_before:.1f} | {total_now:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", type=Path)
    args = parser.parse_args()
    print(f"# {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    rows = run_searches()
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))
    print_table(rows, json.loads(args.compare.read_text()) if args.compare is not None else None)
    print(f"# load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
