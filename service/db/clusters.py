"""Cluster state persistence: one versioned JSON document per cluster, written with optimistic concurrency."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, delete, insert, select, text, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from service.db.models import ClusterState, GpuClaim, PlacementHold, utcnow

DEADLOCK_DETECTED = "40P01"  # PostgreSQL SQLSTATE


class ClusterNotFoundError(Exception):
    """No cluster has that name."""


class StaleVersionError(Exception):
    """The write was based on a version that is no longer current."""

    def __init__(self, current: int | None) -> None:
        super().__init__(f"current version is {current}")
        self.current = current


@dataclass(frozen=True)
class StoredCluster:
    """A cluster document and its version."""

    name: str
    version: int
    state: dict[str, Any]


def current_version(session: Session, *, name: str) -> int | None:
    """The cluster's version, or None when it does not exist (one cheap query)."""
    version = session.scalar(select(ClusterState.version).where(ClusterState.name == name))
    return int(version) if version is not None else None


def get_cluster(session: Session, *, name: str, with_holds: bool = True) -> StoredCluster:
    """The stored cluster; unless ``with_holds`` is off, with the live placement holds written in as reservations
    and queued loads (so that readers such as fleet plans never hand out GPUs a placement holds)."""
    row = session.get(ClusterState, name)
    if row is None:
        raise ClusterNotFoundError(name)
    state = row.state
    if with_holds:
        now_s = time.time()
        live = list(
            session.scalars(
                select(PlacementHold.hold).where(PlacementHold.cluster == name, PlacementHold.expires_at_s > now_s)
            )
        )
        if live:
            state = _with_hold_documents(state, live)
    return StoredCluster(row.name, row.version, state)


def _with_hold_documents(state: dict[str, Any], holds: list[dict[str, Any]]) -> dict[str, Any]:
    """A copy of the cluster document with hold documents added as reservations and queued loads."""
    known = {r.get("id") for r in state.get("reservations", [])}
    reservations = list(state.get("reservations", []))
    queued: dict[str, list[dict[str, Any]]] = {}
    for hold in holds:
        reservation = hold.get("reservation", {})
        if reservation.get("id") in known:
            continue
        reservations.append(reservation)
        for load in hold.get("loads", []):
            queued.setdefault(load.get("server"), []).append(load.get("task"))
    servers = [
        {**server, "loading_queue": [*server.get("loading_queue", []), *queued.get(server.get("name"), [])]}
        if server.get("name") in queued
        else server
        for server in state.get("servers", [])
    ]
    return {**state, "servers": servers, "reservations": reservations}


def put_cluster(session: Session, *, name: str, state: dict[str, Any], if_match: int | None) -> tuple[int, bool]:
    """Create or replace a cluster; with `if_match` only over that version. The new version and whether created."""
    existing = current_version(session, name=name)
    if if_match is not None and existing != if_match:
        raise StaleVersionError(existing)
    if existing is None:
        session.add(ClusterState(name=name, version=1, state=state, updated_at=utcnow()))
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            raise StaleVersionError(current_version(session, name=name)) from None
        return 1, True
    return write_cluster(session, name=name, state=state, expected_version=existing), False


def write_cluster(session: Session, *, name: str, state: dict[str, Any], expected_version: int) -> int:
    """Replace the state if the stored version is still `expected_version`; the new version."""
    try:
        version = write_cluster_in_transaction(session, name=name, state=state, expected_version=expected_version)
    except StaleVersionError:
        session.rollback()
        raise
    session.commit()
    return version


def lock_version(session: Session, *, name: str) -> int | None:
    """The cluster's version, locking its row until the transaction ends (writers on one cluster serialize)."""
    version = session.scalar(select(ClusterState.version).where(ClusterState.name == name).with_for_update())
    return int(version) if version is not None else None


# One statement, prepared once: a placement reads it on every call.
_SNAPSHOT = text(
    "SELECT c.version, h.id FROM clusters c LEFT JOIN placement_holds h "
    "ON h.cluster = c.name AND h.expires_at_s > :now_s WHERE c.name = :name"
)


def snapshot(session: Session, *, name: str, now_s: float) -> tuple[int, list[str]] | None:
    """The cluster's version and the ids of its unexpired holds in one statement; None when there is no cluster."""
    rows = session.execute(_SNAPSHOT, {"name": name, "now_s": now_s}).all()
    if not rows:
        return None
    return int(rows[0][0]), [hold_id for _, hold_id in rows if hold_id is not None]


def holds_by_id(session: Session, *, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Hold documents by id."""
    if not ids:
        return {}
    table = _HOLDS
    return {row.id: row.hold for row in session.execute(select(table.c.id, table.c.hold).where(table.c.id.in_(ids)))}


@dataclass(frozen=True)
class NewHold:
    """A hold to store: its id, the GPUs it claims on one server, its expiry and its JSON document."""

    id: str
    server: str
    gpu_ids: list[int]
    expires_at_s: float
    document: str


# The tables themselves: Core statements skip the ORM's per-row bookkeeping.
_CLAIMS = cast(Table, GpuClaim.__table__)
_HOLDS = cast(Table, PlacementHold.__table__)

# PostgreSQL stores a batch in one statement: the version check (locking the cluster row for share), the GPU
# claims (an expired claim is replaced in place; one held by another placement is not touched) and the holds
# whose claims all landed. The claims go in (server, GPU) order so that two processes' batches wait on each
# other in one order, never in a cycle.
_CLAIM_BATCH = text(
    """
WITH v AS (
    SELECT version FROM clusters WHERE name = :name FOR SHARE
), w AS (
    SELECT * FROM unnest(
        CAST(:claim_holds AS text[]), CAST(:claim_servers AS text[]), CAST(:claim_gpus AS integer[]),
        CAST(:claim_versions AS integer[]), CAST(:claim_expiries AS double precision[])
    ) WITH ORDINALITY AS w(hold_id, server, gpu_id, version, expires_at_s, n)
), c AS (
    INSERT INTO gpu_claims (cluster, server, gpu_id, hold_id, expires_at_s)
    SELECT :name, w.server, w.gpu_id, w.hold_id, w.expires_at_s FROM w JOIN v ON w.version = v.version ORDER BY w.n
    ON CONFLICT (cluster, server, gpu_id) DO UPDATE
        SET hold_id = excluded.hold_id, expires_at_s = excluded.expires_at_s
        WHERE gpu_claims.expires_at_s <= :now_s
    RETURNING hold_id
), h AS (
    INSERT INTO placement_holds (id, cluster, expires_at_s, hold)
    SELECT d.id, :name, d.expires_at_s, CAST(d.hold AS json)
    FROM unnest(
        CAST(:hold_ids AS text[]), CAST(:hold_expiries AS double precision[]), CAST(:hold_documents AS text[]),
        CAST(:hold_gpus AS integer[])
    ) AS d(id, expires_at_s, hold, gpus)
    WHERE d.gpus = (SELECT count(*) FROM c WHERE c.hold_id = d.id)
    RETURNING id
)
SELECT (SELECT version FROM v), ARRAY(SELECT id FROM h)
"""
)


def _unshared(writes: list[tuple[int, list[NewHold]]]) -> list[bool]:
    """Which writes of a batch may go ahead: the later of two that want one GPU decides again."""
    # The database would refuse to touch one row twice in one statement.
    owners: set[tuple[str, int]] = set()
    fine: list[bool] = []
    for _, holds in writes:
        gpus = [(h.server, g) for h in holds for g in h.gpu_ids]
        ok = len(set(gpus)) == len(gpus) and owners.isdisjoint(gpus)
        if ok:
            owners.update(gpus)
        fine.append(ok)
    return fine


def _claim_in_one_statement(
    session: Session, name: str, writes: list[tuple[int, list[NewHold]]], now_s: float
) -> list[bool]:
    """PostgreSQL: the batch in one statement, and two more when writes lost a GPU to another placement."""
    fine = _unshared(writes)
    claims = sorted(
        (h.server, g, h.id, version, h.expires_at_s)
        for ok, (version, holds) in zip(fine, writes, strict=True)
        if ok
        for h in holds
        for g in h.gpu_ids
    )
    holds = [h for ok, (_, hs) in zip(fine, writes, strict=True) if ok for h in hs]
    row = session.execute(
        _CLAIM_BATCH,
        {
            "name": name,
            "now_s": now_s,
            "claim_servers": [c[0] for c in claims],
            "claim_gpus": [c[1] for c in claims],
            "claim_holds": [c[2] for c in claims],
            "claim_versions": [c[3] for c in claims],
            "claim_expiries": [c[4] for c in claims],
            "hold_ids": [h.id for h in holds],
            "hold_expiries": [h.expires_at_s for h in holds],
            "hold_documents": [h.document for h in holds],
            "hold_gpus": [len(h.gpu_ids) for h in holds],
        },
    ).one()
    version, inserted = row[0], set(row[1])
    stored = [
        ok and version == v and all(h.id in inserted for h in hs) for ok, (v, hs) in zip(fine, writes, strict=True)
    ]
    lost = [h.id for ok, won, (_, hs) in zip(fine, stored, writes, strict=True) if ok and not won for h in hs]
    if lost:
        # What those writes did store is given back in this transaction; they decide again.
        session.execute(delete(_CLAIMS).where(_CLAIMS.c.cluster == name, _CLAIMS.c.hold_id.in_(lost)))
        session.execute(delete(_HOLDS).where(_HOLDS.c.id.in_(lost)))
    return stored


def _claim_step_by_step(
    session: Session, name: str, writes: list[tuple[int, list[NewHold]]], now_s: float
) -> list[bool]:
    """Other databases (SQLite): the version check, the claims, and the holds of the writes that got all theirs."""
    version = session.scalar(select(ClusterState.version).where(ClusterState.name == name))
    stored = [ok and version is not None and v == version for ok, (v, _) in zip(_unshared(writes), writes, strict=True)]
    owner = {(h.server, g): (i, h) for i, (_, hs) in enumerate(writes) if stored[i] for h in hs for g in h.gpu_ids}
    if owner:
        upsert = sqlite_insert(_CLAIMS)
        statement = upsert.on_conflict_do_update(
            index_elements=[_CLAIMS.c.cluster, _CLAIMS.c.server, _CLAIMS.c.gpu_id],
            set_={"hold_id": upsert.excluded.hold_id, "expires_at_s": upsert.excluded.expires_at_s},
            where=_CLAIMS.c.expires_at_s <= now_s,
        ).returning(_CLAIMS.c.server, _CLAIMS.c.gpu_id)
        rows = [
            {"cluster": name, "server": gpu[0], "gpu_id": gpu[1], "hold_id": h.id, "expires_at_s": h.expires_at_s}
            for gpu, (_, h) in sorted(owner.items())
        ]
        landed = {(server, int(gpu_id)) for server, gpu_id in session.execute(statement.values(rows))}
        lost = {owner[gpu][0] for gpu in owner if gpu not in landed}
        if lost:
            ids = [h.id for i in lost for h in writes[i][1]]
            session.execute(delete(_CLAIMS).where(_CLAIMS.c.cluster == name, _CLAIMS.c.hold_id.in_(ids)))
            for index in lost:
                stored[index] = False
    documents = [
        {"id": h.id, "cluster": name, "expires_at_s": h.expires_at_s, "hold": json.loads(h.document)}
        for ok, (_, hs) in zip(stored, writes, strict=True)
        if ok
        for h in hs
    ]
    if documents:
        session.execute(insert(_HOLDS), documents)
    return stored


def claim_holds(session: Session, *, name: str, writes: list[tuple[int, list[NewHold]]], now_s: float) -> list[bool]:
    """Store (version decided at, holds) writes in one transaction; for each, whether it was stored."""
    # A write is refused whole when the cluster moved past its version or another placement holds one of its GPUs:
    # the GPU claims' primary key decides, across processes. Reservations run side by side; a state write
    # (``lock_version``) waits for them and they for it.
    try:
        if session.get_bind().dialect.name == "postgresql":
            stored = _claim_in_one_statement(session, name, writes, now_s)
        else:
            stored = _claim_step_by_step(session, name, writes, now_s)
        session.commit()
    except OperationalError as exc:
        session.rollback()
        if getattr(exc.orig, "sqlstate", None) != DEADLOCK_DETECTED:
            raise
        # Claims go in one order, so this should not happen; if it does, the batch decides again.
        return [False] * len(writes)
    except Exception:
        session.rollback()
        raise
    return stored


def delete_expired_holds(session: Session, *, name: str, now_s: float) -> None:
    """Drop expired holds and claims of a cluster (reads skip them; this only keeps the tables small)."""
    session.execute(delete(GpuClaim).where(GpuClaim.cluster == name, GpuClaim.expires_at_s <= now_s))
    session.execute(delete(PlacementHold).where(PlacementHold.cluster == name, PlacementHold.expires_at_s <= now_s))
    session.commit()


def take_all_holds(session: Session, *, name: str) -> list[dict[str, Any]]:
    """Every hold of the cluster, removed in the current transaction (the caller writes them into the state)."""
    documents = [row.hold for row in session.scalars(select(PlacementHold).where(PlacementHold.cluster == name))]
    session.execute(delete(GpuClaim).where(GpuClaim.cluster == name))
    session.execute(delete(PlacementHold).where(PlacementHold.cluster == name))
    return documents


def write_cluster_in_transaction(session: Session, *, name: str, state: dict[str, Any], expected_version: int) -> int:
    """Like write_cluster, inside the caller's transaction (no commit)."""
    result = session.execute(
        update(ClusterState)
        .where(ClusterState.name == name, ClusterState.version == expected_version)
        .values(state=state, version=expected_version + 1, updated_at=utcnow())
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise StaleVersionError(current_version(session, name=name))
    return expected_version + 1
