"""Cluster state persistence: one versioned JSON document per cluster, written with optimistic concurrency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import ClusterState, utcnow


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


def get_cluster(session: Session, *, name: str) -> StoredCluster:
    """The stored cluster."""
    row = session.get(ClusterState, name)
    if row is None:
        raise ClusterNotFoundError(name)
    return StoredCluster(row.name, row.version, row.state)


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
    result = session.execute(
        update(ClusterState)
        .where(ClusterState.name == name, ClusterState.version == expected_version)
        .values(state=state, version=expected_version + 1, updated_at=utcnow())
    )
    session.commit()
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise StaleVersionError(current_version(session, name=name))
    return expected_version + 1
