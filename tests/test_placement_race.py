"""Issue 15: reservations from several API processes on real PostgreSQL; the GPU claims keep answers apart."""

from __future__ import annotations

import multiprocessing
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from service.catalog.loader import default_catalog
from service.db import clusters as cluster_store
from service.db.session import make_engine, make_session_factory
from service.placement.optimizer import PlacementRequest
from service.placement_service import ClusterCache, place_on_cluster, put_cluster
from service.settings import Settings
from tests.conftest import migrated_settings
from tests.test_placement import SMALL, cluster, server

PROCESSES = 3
THREADS = 4


def _reserve_in_process(url: str, name: str, start_at: float, out: Any) -> None:
    """One API process: its own engine and cache, THREADS placements at once, each for one GPU."""
    settings = Settings(database_url=url, broker_url=None, require_api_keys=False)
    engine = make_engine(settings)
    factory = make_session_factory(engine)
    cache = ClusterCache()
    catalog = default_catalog()
    request = PlacementRequest(model=SMALL, tp=1, allow_migration=False)

    def one(_: int) -> list[tuple[str, int]]:
        with factory() as session:
            outcome = place_on_cluster(
                session, cache=cache, catalog=catalog, name=name, request=request, dry_run=False, ttl_s=600.0
            )
        return [(p.server, g) for p in outcome.decision.placements for g in p.gpu_ids]

    time.sleep(max(0.0, start_at - time.time()))
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        got = [gpu for result in pool.map(one, range(THREADS)) for gpu in result]
    engine.dispose()
    out.put(got)


def test_processes_racing_for_the_last_gpus_never_share_one(postgres_url: str, tmp_path: Path) -> None:
    settings = migrated_settings(postgres_url, tmp_path)
    name = f"race-{uuid.uuid4().hex[:8]}"
    # Three free GPUs in all (two on one server, one on the other) for 12 one-GPU placements.
    state = cluster(server("a", busy=(0, 1, 2, 3, 4, 5)), server("b", busy=(0, 1, 2, 3, 4, 5, 6)))
    engine = make_engine(settings)
    factory = make_session_factory(engine)
    with factory() as session:
        put_cluster(session, cache=ClusterCache(), name=name, document=state.model_dump(mode="json"), if_match=None)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 4.0
    procs = [
        ctx.Process(target=_reserve_in_process, args=(postgres_url, name, start_at, out)) for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    claims = [gpu for _ in procs for gpu in out.get(timeout=120)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sorted(claims) == [("a", 6), ("a", 7), ("b", 7)]
    with factory() as session:
        stored = cluster_store.get_cluster(session, name=name)
    held = sorted((r["server"], g) for r in stored.state["reservations"] for g in r["gpu_ids"])
    assert held == [("a", 6), ("a", 7), ("b", 7)]
    engine.dispose()
