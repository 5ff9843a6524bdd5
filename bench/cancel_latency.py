"""How fast a cancel stops a running plan: run_plan on a large search (embedded SQLite), canceled mid-search.

Usage: .venv/bin/python -m bench.cancel_latency [--runs 5]

The plan is the largest the door accepts in simulated work per strategy (3,000 requests per simulation, 70B on up
to 8 GPUs); each run cancels it once its progress reaches a different strategy and times from the cancel's commit
until run_plan returns `aborted`, with the default settings (heartbeat 0.5 s).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from service.catalog.loader import default_catalog
from service.db import plans as plan_store
from service.db.migrate import upgrade
from service.db.session import make_engine, make_session_factory
from service.jobs import run_plan
from service.settings import Settings

SPEC: dict[str, Any] = {
    "model": "llama-3.1-70b",
    "gpu": "h100-sxm",
    "max_gpus": 8,
    "workload": {"arrival": "poisson", "isl": 512, "osl": 64, "rate": 2},
    "slo": {"ttft_ms": 500, "tpot_ms": 50},
    "search": {"tp": [2, 4, 8], "pp": [1], "modes": ["collocated"], "requests": 3000, "simulate_top": 3},
}


def one_cancel(settings: Settings, after_progress: int) -> float:
    """Seconds from the cancel to run_plan returning, canceling once `after_progress` strategies are done."""
    sessions = make_session_factory(make_engine(settings))
    with sessions() as session:
        new = plan_store.NewPlan(SPEC, "strategy", SPEC["model"], SPEC["gpu"], 3)
        plan, _ = plan_store.create_plan(session, new=new, idempotency_key=None)
    outcome: list[str] = []
    runner = threading.Thread(
        target=lambda: outcome.append(run_plan(plan.id, session_factory=sessions, settings=settings))
    )
    runner.start()
    while True:
        with sessions() as session:
            if plan_store.get_plan(session, plan_id=plan.id).progress_done >= after_progress:
                break
        time.sleep(0.02)
    with sessions() as session:
        plan_store.cancel_plan(session, plan_id=plan.id)
    canceled = time.monotonic()
    runner.join()
    assert outcome == ["aborted"], outcome
    return time.monotonic() - canceled


def main() -> None:
    """Cancel the plan `--runs` times at different points; print each time and the worst."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        settings = Settings(database_url=f"sqlite:///{Path(directory) / 'splan.db'}", broker_url=None)
        upgrade(settings)
        default_catalog()
        times = [one_cancel(settings, after_progress=1 + run % 2) for run in range(args.runs)]
    print(f"heartbeat_s {settings.plan_heartbeat_s}")
    print("run | canceled after strategies | stopped after (s)")
    for run, stopped_s in enumerate(times):
        print(f"{run + 1} | {1 + run % 2} | {stopped_s:.3f}")
    print(f"median {statistics.median(times):.3f} s, worst {max(times):.3f} s (target <= 1 s)")


if __name__ == "__main__":
    main()
