"""Issue 15: reservations stored in batches (one transaction per batch); the GPU claims decide which writes hold."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

from sqlalchemy import select, text

from service.db import clusters as cluster_store
from service.db.models import GpuClaim, PlacementHold
from service.db.session import make_engine, make_session_factory
from service.placement_service import ClusterCache, GroupCommit, put_cluster
from service.settings import Settings
from tests.conftest import migrated_settings
from tests.test_placement import cluster, server


def _hold(hold_id: str, server_name: str, gpu_ids: list[int], expires_at_s: float) -> cluster_store.NewHold:
    return cluster_store.NewHold(hold_id, server_name, gpu_ids, expires_at_s, json.dumps({"id": hold_id}))


def test_a_batch_stores_only_the_writes_that_get_all_their_gpus(db_settings: Settings) -> None:
    engine = make_engine(db_settings)
    factory = make_session_factory(engine)
    name = f"batch-{uuid.uuid4().hex[:8]}"
    now_s = time.time()
    later_s = now_s + 600
    with factory() as session:
        put_cluster(
            session,
            cache=ClusterCache(),
            name=name,
            document=cluster(server("a"), server("b")).model_dump(mode="json"),
            if_match=None,
        )
        # Held by another placement: a:0 until later; a:1 by one that has expired.
        assert cluster_store.claim_holds(
            session,
            name=name,
            writes=[(1, [_hold("p", "a", [0], later_s)]), (1, [_hold("x", "a", [1], now_s - 10)])],
            now_s=now_s - 20,
        ) == [True, True]
        stored = cluster_store.claim_holds(
            session,
            name=name,
            writes=[
                (1, [_hold("ok", "a", [2, 3], later_s)]),
                (0, [_hold("stale", "b", [0], later_s)]),  # decided on an older version
                (1, [_hold("overlap", "a", [3], later_s)]),  # wants a GPU of the first write of the batch
                (1, [_hold("d1", "b", [1], later_s), _hold("d2", "a", [0], later_s)]),  # a:0 is p's
                (1, [_hold("expired", "a", [1], later_s)]),  # replaces x's expired claim
            ],
            now_s=now_s,
        )
        assert stored == [True, False, False, False, True]
        claims = {
            (c.server, c.gpu_id): c.hold_id for c in session.scalars(select(GpuClaim).where(GpuClaim.cluster == name))
        }
        assert claims == {("a", 0): "p", ("a", 1): "expired", ("a", 2): "ok", ("a", 3): "ok"}
        held = session.scalars(select(PlacementHold.id).where(PlacementHold.cluster == name))
        assert sorted(held) == ["expired", "ok", "p", "x"]
        version, live = cluster_store.snapshot(session, name=name, now_s=now_s) or (0, [])
        assert (version, sorted(live)) == (1, ["expired", "ok", "p"])
        assert cluster_store.snapshot(session, name="nope", now_s=now_s) is None
    engine.dispose()


def test_writes_that_arrive_while_a_batch_is_stored_go_together_next(postgres_url: str, tmp_path: Path) -> None:
    engine = make_engine(migrated_settings(postgres_url, tmp_path))
    factory = make_session_factory(engine)
    name = f"group-{uuid.uuid4().hex[:8]}"
    with factory() as session:
        document = cluster(server("a"), server("b")).model_dump(mode="json")
        put_cluster(session, cache=ClusterCache(), name=name, document=document, if_match=None)
    commits = GroupCommit()
    results: dict[int, bool] = {}
    expires_at_s = time.time() + 600

    def write(index: int) -> None:
        with factory() as session:
            holds = [_hold(f"h{index}", "a" if index < 8 else "b", [index % 8], expires_at_s)]
            results[index] = commits.write(session, name=name, version=1, holds=holds)

    def blocked_on_locks() -> int:
        with engine.connect() as conn:
            query = (
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            return int(conn.execute(text(query)).scalar_one())

    # A state write holds the cluster row, so the first batch (one write) waits on it while five more arrive.
    blocker = engine.connect()
    blocker.execute(text("SELECT version FROM clusters WHERE name = :n FOR UPDATE"), {"n": name})
    first = threading.Thread(target=write, args=(0,))
    first.start()
    deadline = time.monotonic() + 10
    while blocked_on_locks() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    others = [threading.Thread(target=write, args=(i,)) for i in (1, 2, 9, 10, 11)]
    for thread in others:
        thread.start()
    while commits.waiting(name) < len(others) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (blocked_on_locks(), commits.waiting(name), commits.batches) == (1, len(others), 0)
    blocker.rollback()
    blocker.close()
    for thread in [first, *others]:
        thread.join(timeout=30)
    assert results == dict.fromkeys((0, 1, 2, 9, 10, 11), True)
    assert (commits.batches, commits.writes) == (2, 6)
    with factory() as session:
        rows = session.scalars(select(GpuClaim).where(GpuClaim.cluster == name)).all()
    assert sorted((c.server, c.gpu_id, c.hold_id) for c in rows) == [
        ("a", 0, "h0"),
        ("a", 1, "h1"),
        ("a", 2, "h2"),
        ("b", 1, "h9"),
        ("b", 2, "h10"),
        ("b", 3, "h11"),
    ]
    engine.dispose()
