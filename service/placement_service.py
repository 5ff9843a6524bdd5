"""Cluster and placement use cases over the database: parsed-state cache, events, reserve-or-retry."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from service.db import clusters as cluster_store
from service.placement.cluster import Cluster, ClusterError, Hold, apply_events, parse_cluster, parse_events
from service.placement.optimizer import PlacementDecision, PlacementRequest, hold_decision, place, with_holds
from service.placement.prewarm import PrewarmAdvice, PrewarmRequest, advise_prewarm
from service.planning.catalog import Catalog

RESERVE_RETRIES = 5


@dataclass(frozen=True)
class PlacementOutcome:
    """A placement decision, the reservations it holds and the cluster version they were written at."""

    decision: PlacementDecision
    reservation_ids: list[str]
    cluster_version: int
    dry_run: bool


# Bound of the parsed-cluster cache, in bytes of the clusters' JSON documents: a parsed cluster takes about 20 times
# its JSON in the API process (a 1 MiB document, ~25,000 GPUs, ~19 MiB), so 8 MiB of documents is ~160 MiB.
MAX_CACHED_DOCUMENT_BYTES = 8 * 1024 * 1024


def _document_bytes(cluster: Cluster) -> int:
    """Size of a cluster's JSON document."""
    return len(cluster.model_dump_json())


@dataclass
class _Write:
    """One placement's holds waiting to be stored with the next batch, and how that went."""

    version: int
    holds: list[cluster_store.NewHold]
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    stored: bool = False
    error: BaseException | None = None


class GroupCommit:
    """Stores reservations in batches per cluster: one transaction and one statement per batch."""

    # A lone write is stored at once (a batch of one); writes that arrive while a batch is being stored wait and are
    # stored together next, by the first of them on its own session, so the database work per reservation falls as
    # the load rises. Each write hears whether it was stored; one refused (its GPUs claimed by another placement,
    # or the cluster changed) decides again.

    def __init__(self, max_batch: int = 64) -> None:
        self.max_batch = max_batch
        self.batches = 0
        self.writes = 0
        self._lock = threading.Lock()
        self._waiting: dict[str, list[_Write]] = {}
        self._writing: set[str] = set()

    def waiting(self, name: str) -> int:
        """Writes on the cluster waiting for the batch being stored to finish."""
        with self._lock:
            return len(self._waiting.get(name, ()))

    def write(self, session: Session, *, name: str, version: int, holds: list[cluster_store.NewHold]) -> bool:
        """Store the holds decided at ``version`` with the next batch; whether they were stored."""
        mine = _Write(version, holds)
        with self._lock:
            self._waiting.setdefault(name, []).append(mine)
            lead = name not in self._writing
            self._writing.add(name)
        if not lead:
            mine.done.wait()
            if not mine.lead:
                if mine.error is not None:
                    raise mine.error
                return mine.stored
        with self._lock:
            queue = self._waiting[name]
            batch = queue[: self.max_batch]
            del queue[: self.max_batch]
        try:
            stored = cluster_store.claim_holds(
                session, name=name, writes=[(w.version, w.holds) for w in batch], now_s=time.time()
            )
            for write, ok in zip(batch, stored, strict=True):
                write.stored = ok
        except BaseException as exc:  # every write of the batch hears why, not only the one that stored it
            for write in batch:
                write.error = exc
        finally:
            with self._lock:
                self.batches += 1
                self.writes += len(batch)
                queue = self._waiting[name]
                if queue:
                    # The next batch is written by the first of its writers, on its session.
                    queue[0].lead = True
                    queue[0].done.set()
                else:
                    self._writing.discard(name)
                    del self._waiting[name]
            for write in batch:
                if write is not mine:
                    write.done.set()
        if mine.error is not None:
            raise mine.error
        return mine.stored


class ClusterCache:
    """Parsed clusters by (name, version) and parsed holds by id: a placement reads a version and hold ids."""

    def __init__(
        self, max_entries: int = 64, max_holds: int = 100_000, max_document_bytes: int = MAX_CACHED_DOCUMENT_BYTES
    ) -> None:
        self.max_entries = max_entries
        self.max_holds = max_holds
        self.max_document_bytes = max_document_bytes
        self.commits = GroupCommit()
        self._entries: dict[str, tuple[int, Cluster]] = {}
        self._sizes: dict[str, int] = {}
        self._holds: dict[str, Hold] = {}
        self._lock = threading.Lock()
        self._deciding: dict[str, threading.Lock] = {}
        self._in_flight: dict[str, dict[str, Hold]] = {}
        self._stored: dict[str, dict[str, tuple[int, Hold]]] = {}
        self._swept_s: dict[str, float] = {}

    def deciding(self, name: str) -> threading.Lock:
        """Held by one of this process's threads while it decides on a cluster (CPU only, never across database
        I/O), so that its threads see each other's in-flight holds and do not pick the same GPUs."""
        with self._lock:
            return self._deciding.setdefault(name, threading.Lock())

    def in_flight(self, name: str, *, version: int | None = None, now_s: float = 0.0) -> list[Hold]:
        """Holds this process decided on a cluster and is still writing; with ``version``, also its live stored ones."""
        # A snapshot read just before a sibling thread's commit misses that sibling's holds; they are shown here
        # while the cluster stays at the version they were stored at.
        with self._lock:
            flying = list(self._in_flight.get(name, {}).values())
            if version is None:
                return flying
            stored = self._stored.get(name, {})
            for rid in [rid for rid, (_, h) in stored.items() if not h.reservation.active(now_s)]:
                del stored[rid]
            return [*flying, *(h for v, h in stored.values() if v == version)]

    def start_flight(self, name: str, holds: list[Hold]) -> None:
        """Mark holds as decided and being written."""
        with self._lock:
            flying = self._in_flight.setdefault(name, {})
            for hold in holds:
                flying[hold.reservation.id] = hold

    def end_flight(self, name: str, holds: list[Hold], *, stored_at: int | None = None) -> None:
        """The holds are committed at version ``stored_at`` (and will be read back as holds) or were refused."""
        with self._lock:
            flying = self._in_flight.get(name, {})
            for hold in holds:
                flying.pop(hold.reservation.id, None)
            if stored_at is not None:
                mine = self._stored.setdefault(name, {})
                for hold in holds:
                    mine[hold.reservation.id] = (stored_at, hold)
                    self._holds[hold.reservation.id] = hold

    def sweep_due(self, name: str, now_s: float, every_s: float = 1.0) -> bool:
        """Whether this process should drop the cluster's expired holds now (at most once per ``every_s``)."""
        with self._lock:
            if now_s - self._swept_s.get(name, 0.0) < every_s:
                return False
            self._swept_s[name] = now_s
            return True

    def load(self, session: Session, *, name: str) -> tuple[int, Cluster]:
        """The current version of a cluster, parsed."""
        version = cluster_store.current_version(session, name=name)
        if version is None:
            raise cluster_store.ClusterNotFoundError(name)
        return self._parsed(session, name=name, version=version)

    def state(self, session: Session, *, name: str, now_s: float) -> tuple[int, Cluster, list[Hold]]:
        """The current version of a cluster, parsed, and its unexpired holds (one query when both are cached)."""
        snapshot = cluster_store.snapshot(session, name=name, now_s=now_s)
        if snapshot is None:
            raise cluster_store.ClusterNotFoundError(name)
        version, cluster = self._parsed(session, name=name, version=snapshot[0])
        return version, cluster, self._holds_by_id(session, snapshot[1])

    def _parsed(self, session: Session, *, name: str, version: int) -> tuple[int, Cluster]:
        with self._lock:
            hit = self._entries.get(name)
        if hit is not None and hit[0] == version:
            return hit
        # The holds are kept apart (see holds()): the parsed document is cached per version.
        stored = cluster_store.get_cluster(session, name=name, with_holds=False)
        parsed = parse_cluster(stored.state)
        self.remember(name, stored.version, parsed)
        return stored.version, parsed

    def remember(self, name: str, version: int, cluster: Cluster) -> None:
        """Keep a parsed cluster we just wrote or read, evicting the oldest past the entry or byte bound."""
        size = _document_bytes(cluster)
        with self._lock:
            self._entries.pop(name, None)
            self._sizes.pop(name, None)
            if size > self.max_document_bytes:
                return  # larger than the whole cache: parsed again on each use
            while self._entries and (
                len(self._entries) >= self.max_entries or sum(self._sizes.values()) + size > self.max_document_bytes
            ):
                oldest = next(iter(self._entries))
                self._entries.pop(oldest)
                self._sizes.pop(oldest, None)
            self._entries[name] = (version, cluster)
            self._sizes[name] = size

    def cached_document_bytes(self) -> int:
        """JSON bytes of the clusters held (their parsed form takes about 20 times as much)."""
        with self._lock:
            return sum(self._sizes.values())

    def holds(self, session: Session, *, name: str, now_s: float) -> list[Hold]:
        """The cluster's unexpired holds; only ones not seen before are fetched and parsed."""
        snapshot = cluster_store.snapshot(session, name=name, now_s=now_s)
        return self._holds_by_id(session, snapshot[1]) if snapshot is not None else []

    def _holds_by_id(self, session: Session, ids: list[str]) -> list[Hold]:
        with self._lock:
            missing = [i for i in ids if i not in self._holds]
        if missing:
            fetched = {
                i: Hold.model_validate(doc) for i, doc in cluster_store.holds_by_id(session, ids=missing).items()
            }
            self.remember_holds(list(fetched.values()))
        with self._lock:
            return [self._holds[i] for i in ids if i in self._holds]

    def remember_holds(self, holds: list[Hold]) -> None:
        """Keep parsed holds (the oldest are dropped past the limit; they are fetched again if still live)."""
        with self._lock:
            for hold in holds:
                self._holds[hold.reservation.id] = hold
            while len(self._holds) > self.max_holds:
                self._holds.pop(next(iter(self._holds)))


def current_state(session: Session, *, cache: ClusterCache, name: str) -> tuple[int, Cluster]:
    """The stored cluster with its outstanding holds shown as reservations."""
    now_s = time.time()
    version, cluster, holds = cache.state(session, name=name, now_s=now_s)
    session.rollback()  # hand the connection back before the (thread-bound) response serialization
    return version, with_holds(cluster, holds, now_s=now_s) if holds else cluster


def put_cluster(
    session: Session, *, cache: ClusterCache, name: str, document: dict[str, Any], if_match: int | None
) -> tuple[int, bool, Cluster]:
    """Validate and store a whole cluster state (outstanding holds stay until they expire)."""
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
    """Apply events to the state with its holds folded in; without If-Match a concurrent write is retried."""
    parsed_events = parse_events(events)
    for _ in range(RESERVE_RETRIES):
        version, cluster = cache.load(session, name=name)
        if if_match is not None and version != if_match:
            raise cluster_store.StaleVersionError(version)
        try:
            if cluster_store.lock_version(session, name=name) != version:
                session.rollback()
                continue
            now_s = time.time()
            holds = [Hold.model_validate(doc) for doc in cluster_store.take_all_holds(session, name=name)]
            updated = apply_events(with_holds(cluster, holds, now_s=now_s), parsed_events, now_s=now_s)
            new_version = cluster_store.write_cluster_in_transaction(
                session, name=name, state=updated.model_dump(mode="json"), expected_version=version
            )
            session.commit()
        except Exception:
            session.rollback()
            raise
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
    """Decide, and unless dry-run hold what the decision uses: GPU claims that two requests cannot share.

    The claims table keeps two answers apart, across threads and processes: a decision whose GPUs another
    placement claimed first is refused by the primary key and made again on the new state. Within a process,
    threads decide one at a time and see each other's holds still being written, so they rarely collide, and
    their holds are stored in batches (``GroupCommit``).
    """
    for _ in range(RESERVE_RETRIES):
        now_s = time.time()
        version, cluster, holds = cache.state(session, name=name, now_s=now_s)
        if dry_run:
            session.rollback()  # hand the connection back before deciding
            decision = place(cluster, request, now_s=now_s, catalog=catalog, holds=holds)
            return PlacementOutcome(decision, [], version, dry_run)
        with cache.deciding(name):
            known = {h.reservation.id for h in holds}
            mine = cache.in_flight(name, version=version, now_s=now_s)
            seen = [*holds, *(h for h in mine if h.reservation.id not in known)]
            decision = place(cluster, request, now_s=now_s, catalog=catalog, holds=seen)
            if not decision.placements:
                session.rollback()
                return PlacementOutcome(decision, [], version, dry_run)
            try:
                new = hold_decision(cluster, decision, now_s=now_s, ttl_s=ttl_s, holds=seen)
            except ClusterError:
                session.rollback()
                continue
            cache.start_flight(name, new)
        stored = False
        try:
            rows = [
                cluster_store.NewHold(
                    h.reservation.id,
                    h.reservation.server,
                    h.reservation.gpu_ids,
                    h.reservation.expires_at_s,
                    h.model_dump_json(),
                )
                for h in new
            ]
            stored = cache.commits.write(session, name=name, version=version, holds=rows)
        finally:
            cache.end_flight(name, new, stored_at=version if stored else None)
        if not stored:
            # Someone else took one of these GPUs or changed the cluster: decide again on the new state.
            continue
        if cache.sweep_due(name, now_s):
            cluster_store.delete_expired_holds(session, name=name, now_s=now_s)
        return PlacementOutcome(decision, [h.reservation.id for h in new], version, dry_run)
    raise cluster_store.StaleVersionError(cluster_store.current_version(session, name=name))


def prewarm_on_cluster(
    session: Session, *, cache: ClusterCache, catalog: Catalog, name: str, request: PrewarmRequest
) -> tuple[int, PrewarmAdvice]:
    """(cluster version, advice) for prewarming a stored cluster; nothing on the cluster changes.

    Raises ClusterNotFoundError; PlanningError or ClusterError for advice the request cannot get.
    """
    version, cluster = current_state(session, cache=cache, name=name)
    return version, advise_prewarm(cluster, request, catalog=catalog, now_s=time.time())
