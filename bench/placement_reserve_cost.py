"""CPU time and SQL statements per placement through the use case (no HTTP), on a throw-away PostgreSQL database.

Usage: python -m bench.placement_reserve_cost [--calls 600] [--dry-run] [--ttl-s 2] [--threads 1] [--pg-admin URL]

Stores the synthetic 64-server / 512-GPU / 200-instance cluster, then calls place_on_cluster `--calls` times, at
most 200 per second (one after another, or started on schedule on `--threads` threads, as an API process's request
threads would), reserving with `--ttl-s` holds (default 2 s) or dry runs, and prints statements per call, CPU ms per
call (the calling thread's; and the share in place()), reservations stored per batch (group commit) and wall-clock
p50/p99.
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from sqlalchemy import event

import service.placement_service as use_case
from bench.api_load import fresh_database
from service.catalog.loader import default_catalog
from service.db.migrate import upgrade
from service.db.session import make_engine, make_session_factory
from service.placement.optimizer import PlacementRequest
from service.placement.replay import REPLAY_MODELS, synthetic_cluster
from service.settings import Settings


def main() -> None:
    """Measure and print one line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--ttl-s", type=float, default=2.0, help="hold lifetime")
    parser.add_argument("--threads", type=int, default=1, help="calls in flight at once (1: one after another)")
    parser.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    with fresh_database(args.pg_admin) as url:
        settings = Settings(database_url=url, broker_url=None, require_api_keys=False)
        upgrade(settings)
        engine = make_engine(settings)
        factory = make_session_factory(engine)
        statements = [0]

        @event.listens_for(engine, "before_cursor_execute")
        def _count(*_: Any) -> None:
            statements[0] += 1

        catalog = default_catalog()
        cache = use_case.ClusterCache()
        state = synthetic_cluster(catalog=catalog, servers=64, gpus_per_server=8, instances=200, seed=0)
        with factory() as session:
            use_case.put_cluster(
                session, cache=cache, name="bench", document=state.model_dump(mode="json"), if_match=None
            )
        rng = np.random.default_rng(0)
        requests = []
        for _ in range(args.calls):
            model, tp = REPLAY_MODELS[int(rng.integers(len(REPLAY_MODELS)))]
            requests.append(PlacementRequest(model=model, tp=tp, checkpoint=f"{model}@ft{int(rng.integers(16))}"))
        place = vars(use_case)["place"]
        place_cpu_s = [0.0]
        lock = threading.Lock()

        def timed_place(*a: Any, **k: Any) -> Any:
            started = time.thread_time()
            try:
                return place(*a, **k)
            finally:
                spent = time.thread_time() - started
                with lock:
                    place_cpu_s[0] += spent

        def call(request: PlacementRequest, scheduled: float) -> tuple[float, float, bool]:
            """CPU ms of this thread, wall ms from the scheduled start (no coordinated omission), placed."""
            cpu = time.thread_time()
            with factory() as session:
                outcome = use_case.place_on_cluster(
                    session,
                    cache=cache,
                    catalog=catalog,
                    name="bench",
                    request=request,
                    dry_run=args.dry_run,
                    ttl_s=args.ttl_s,
                )
            return (
                (time.thread_time() - cpu) * 1e3,
                (time.perf_counter() - scheduled) * 1e3,
                bool(outcome.decision.placements),
            )

        vars(use_case)["place"] = timed_place
        before = statements[0]
        results: list[tuple[float, float, bool]] = []
        if args.threads <= 1:
            for request in requests:
                started = time.perf_counter()
                results.append(call(request, started))
                time.sleep(max(0.0, 0.005 - (time.perf_counter() - started)))
        else:
            start_s = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.threads) as pool:
                futures = []
                for index, request in enumerate(requests):
                    scheduled = start_s + index * 0.005
                    time.sleep(max(0.0, scheduled - time.perf_counter()))
                    futures.append(pool.submit(call, request, scheduled))
                results = [f.result() for f in futures]
        vars(use_case)["place"] = place
        engine.dispose()
    cpu_ms = [r[0] for r in results]
    wall_ms = [r[1] for r in results]
    placed = sum(r[2] for r in results)
    commits = cache.commits
    n = args.calls
    print(
        f"{'dry run' if args.dry_run else f'reserve (ttl {args.ttl_s:g} s)'}: {n} calls, placed {placed}; "
        f"statements/call "
        f"{(statements[0] - before) / n:.2f}; CPU ms/call {np.mean(cpu_ms):.2f} "
        f"(place() {place_cpu_s[0] * 1e3 / n:.2f}); "
        f"reservations/batch {f'{commits.writes / commits.batches:.2f}' if commits.batches else '-'}; "
        f"wall ms p50 {np.percentile(wall_ms, 50):.2f} p99 {np.percentile(wall_ms, 99):.2f}"
    )


if __name__ == "__main__":
    main()
