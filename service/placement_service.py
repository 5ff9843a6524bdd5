"""Cluster and placement use cases over the database: parsed-state cache, events, reserve-or-retry."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from service.db import clusters as cluster_store
from service.placement.cluster import Cluster, ClusterError, apply_events, parse_cluster, parse_events
from service.placement.optimizer import PlacementDecision, PlacementRequest, place, reserve
from service.planning.catalog import Catalog

RESERVE_RETRIES = 5


@dataclass(frozen=True)
class PlacementOutcome:
    """A placement decision, the reservations it holds and the cluster version they were written at."""

    decision: PlacementDecision
    reservation_ids: list[str]
    cluster_version: int
    dry_run: bool


class ClusterCache:
    """Parsed clusters by (name, version): a placement reads one version number, not the whole document."""

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._entries: dict[str, tuple[int, Cluster]] = {}
        self._lock = threading.Lock()

    def load(self, session: Session, *, name: str) -> tuple[int, Cluster]:
        """The current version of a cluster, parsed."""
        version = cluster_store.current_version(session, name=name)
        if version is None:
            raise cluster_store.ClusterNotFoundError(name)
        with self._lock:
            hit = self._entries.get(name)
        if hit is not None and hit[0] == version:
            return hit
        stored = cluster_store.get_cluster(session, name=name)
        parsed = parse_cluster(stored.state)
        self.remember(name, stored.version, parsed)
        return stored.version, parsed

    def remember(self, name: str, version: int, cluster: Cluster) -> None:
        """Keep a parsed cluster we just wrote or read."""
        with self._lock:
            if name not in self._entries and len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
            self._entries[name] = (version, cluster)


def put_cluster(
    session: Session, *, cache: ClusterCache, name: str, document: dict[str, Any], if_match: int | None
) -> tuple[int, bool, Cluster]:
    """Validate and store a whole cluster state."""
    cluster = parse_cluster(document)
    state = cluster.model_dump(mode="json")
    version, created = cluster_store.put_cluster(session, name=name, state=state, if_match=if_match)
    cache.remember(name, version, cluster)
    return version, created, cluster


def post_events(
    session: Session,
    *,
    cache: ClusterCache,
    name: str,
    events: list[dict[str, Any]],
    if_match: int | None,
) -> tuple[int, Cluster]:
    """Apply events to the current state; without If-Match a concurrent write is retried on the new state."""
    parsed_events = parse_events(events)
    for _ in range(RESERVE_RETRIES):
        version, cluster = cache.load(session, name=name)
        if if_match is not None and version != if_match:
            raise cluster_store.StaleVersionError(version)
        updated = apply_events(cluster, parsed_events, now_s=time.time())
        try:
            new_version = cluster_store.write_cluster(
                session, name=name, state=updated.model_dump(mode="json"), expected_version=version
            )
        except cluster_store.StaleVersionError:
            if if_match is not None:
                raise
            continue
        cache.remember(name, new_version, updated)
        return new_version, updated
    raise cluster_store.StaleVersionError(cluster_store.current_version(session, name=name))


def place_on_cluster(
    session: Session,
    *,
    cache: ClusterCache,
    catalog: Catalog,
    name: str,
    request: PlacementRequest,
    dry_run: bool,
    ttl_s: float,
) -> PlacementOutcome:
    """Decide, and unless dry-run reserve what the decision uses with a version-checked write (retried)."""
    for _ in range(RESERVE_RETRIES):
        version, cluster = cache.load(session, name=name)
        now_s = time.time()
        decision = place(cluster, request, now_s=now_s, catalog=catalog)
        if dry_run or not decision.placements:
            return PlacementOutcome(decision, [], version, dry_run)
        try:
            held = reserve(cluster, decision, now_s=now_s, ttl_s=ttl_s)
        except ClusterError:
            continue
        before = {r.id for r in cluster.reservations}
        new_ids = [r.id for r in held.reservations if r.id not in before]
        try:
            new_version = cluster_store.write_cluster(
                session, name=name, state=held.model_dump(mode="json"), expected_version=version
            )
        except cluster_store.StaleVersionError:
            # Someone else changed the cluster (maybe took these GPUs): decide again on the new state.
            continue
        cache.remember(name, new_version, held)
        return PlacementOutcome(decision, new_ids, new_version, dry_run)
    raise cluster_store.StaleVersionError(cluster_store.current_version(session, name=name))
