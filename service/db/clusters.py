"""Cluster state persistence: one versioned JSON document per cluster, written with optimistic concurrency."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import ClusterState, GpuClaim, PlacementHold, utcnow


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


class HoldConflictError(Exception):
    """Another placement claimed one of the GPUs first."""


def lock_version(session: Session, *, name: str) -> int | None:
    """The cluster's version, locking its row until the transaction ends (writers on one cluster serialize)."""
    version = session.scalar(select(ClusterState.version).where(ClusterState.name == name).with_for_update())
    return int(version) if version is not None else None


def active_hold_ids(session: Session, *, name: str, now_s: float) -> list[str]:
    """Ids of the holds that have not expired."""
    query = select(PlacementHold.id).where(PlacementHold.cluster == name, PlacementHold.expires_at_s > now_s)
    return list(session.scalars(query))


def holds_by_id(session: Session, *, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Hold documents by id."""
    if not ids:
        return {}
    return {row.id: row.hold for row in session.scalars(select(PlacementHold).where(PlacementHold.id.in_(ids)))}


def insert_holds(
    session: Session,
    *,
    name: str,
    expected_version: int,
    holds: list[tuple[str, str, list[int], float, dict[str, Any]]],
    now_s: float,
) -> None:
    """Store holds (id, server, GPU ids, expiry, document) if the cluster is still at `expected_version`.

    The cluster row is locked for share: reservations on one cluster run side by side (the GPU claims' primary
    key refuses a second claim on a GPU), while a state write (``lock_version``) waits for them and they for it.
    Four statements: the version check, clearing expired claims on these GPUs only, and one insert per table.
    """
    try:
        version = session.scalar(
            select(ClusterState.version).where(ClusterState.name == name).with_for_update(read=True)
        )
        if version != expected_version:
            raise StaleVersionError(int(version) if version is not None else None)
        gpus = [(server, gpu_id) for _, server, gpu_ids, _, _ in holds for gpu_id in gpu_ids]
        if gpus:
            session.execute(
                delete(GpuClaim).where(
                    GpuClaim.cluster == name,
                    GpuClaim.expires_at_s <= now_s,
                    or_(*(and_(GpuClaim.server == server, GpuClaim.gpu_id == gpu_id) for server, gpu_id in gpus)),
                )
            )
        session.execute(
            insert(PlacementHold),
            [
                {"id": hold_id, "cluster": name, "expires_at_s": expires_at_s, "hold": document}
                for hold_id, _, _, expires_at_s, document in holds
            ],
        )
        claims = [
            {"cluster": name, "server": server, "gpu_id": gpu_id, "hold_id": hold_id, "expires_at_s": expires_at_s}
            for hold_id, server, gpu_ids, expires_at_s, _ in holds
            for gpu_id in gpu_ids
        ]
        if claims:
            session.execute(insert(GpuClaim), claims)
        session.commit()
    except IntegrityError:
        session.rollback()
        raise HoldConflictError from None
    except Exception:
        session.rollback()
        raise


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
