"""The fleet candidate cache: search results by content hash, and claims (with leases) on searches in progress."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import FleetCandidate, utcnow

PENDING, RUNNING, DONE = "pending", "running", "done"


def done_results(session: Session, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Results of the finished searches among the keys."""
    wanted = list(keys)
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(wanted), 500):
        rows = session.execute(
            select(FleetCandidate.key, FleetCandidate.result).where(
                FleetCandidate.key.in_(wanted[start : start + 500]), FleetCandidate.status == DONE
            )
        )
        found.update({key: result for key, result in rows if result is not None})
    return found


def add_pending(session: Session, tasks: Iterable[tuple[str, dict[str, Any]]]) -> None:
    """Record searches to do (key, spec); a key already present stays as it is."""
    now = utcnow()
    for key, spec in tasks:
        try:
            with session.begin_nested():
                session.add(
                    FleetCandidate(key=key, status=PENDING, spec=spec, attempts=0, created_at=now, updated_at=now)
                )
        except IntegrityError:
            continue
    session.commit()


def claim(session: Session, *, key: str, worker: str, lease_s: float) -> dict[str, Any] | None:
    """Take a pending search, or one whose lease lapsed (its worker was lost): its spec, or None when it is done or
    another worker holds it."""
    now = utcnow()
    taken = session.execute(
        update(FleetCandidate)
        .where(
            FleetCandidate.key == key,
            or_(
                FleetCandidate.status == PENDING,
                (FleetCandidate.status == RUNNING) & (FleetCandidate.lease_expires_at < now),
            ),
        )
        .values(
            status=RUNNING,
            worker=worker,
            lease_expires_at=now + timedelta(seconds=lease_s),
            attempts=FleetCandidate.attempts + 1,
            updated_at=now,
        )
    ).rowcount  # type: ignore[attr-defined]
    session.commit()
    if not taken:
        return None
    spec = session.execute(select(FleetCandidate.spec).where(FleetCandidate.key == key)).scalar_one()
    return dict(spec)


def renew(session: Session, *, key: str, worker: str, lease_s: float) -> bool:
    """Extend this worker's lease on a search; False when it lost the claim."""
    now = utcnow()
    owned = session.execute(
        update(FleetCandidate)
        .where(FleetCandidate.key == key, FleetCandidate.worker == worker, FleetCandidate.status == RUNNING)
        .values(lease_expires_at=now + timedelta(seconds=lease_s), updated_at=now)
    ).rowcount  # type: ignore[attr-defined]
    session.commit()
    return bool(owned)


def release(session: Session, *, key: str, worker: str) -> None:
    """Give a claimed search back (its plan was canceled): pending again for whoever needs it next."""
    session.execute(
        update(FleetCandidate)
        .where(FleetCandidate.key == key, FleetCandidate.worker == worker, FleetCandidate.status == RUNNING)
        .values(status=PENDING, worker=None, lease_expires_at=None, updated_at=utcnow())
    )
    session.commit()


def finish(session: Session, *, key: str, result: dict[str, Any], search_s: float) -> None:
    """Store a search's result (whoever computed it: the result depends only on the key)."""
    session.execute(
        update(FleetCandidate)
        .where(FleetCandidate.key == key, FleetCandidate.status != DONE)
        .values(status=DONE, result=result, search_s=search_s, lease_expires_at=None, updated_at=utcnow())
    )
    session.commit()


def put(session: Session, *, key: str, spec: dict[str, Any], result: dict[str, Any], search_s: float) -> None:
    """Store a result computed without a claim (a local pool)."""
    add_pending(session, [(key, spec)])
    finish(session, key=key, result=result, search_s=search_s)


def states(session: Session, keys: Iterable[str]) -> dict[str, str]:
    """Status of each key that has a row."""
    wanted = list(keys)
    out: dict[str, str] = {}
    for start in range(0, len(wanted), 500):
        rows = session.execute(
            select(FleetCandidate.key, FleetCandidate.status).where(FleetCandidate.key.in_(wanted[start : start + 500]))
        )
        out.update((str(key), str(status)) for key, status in rows)
    return out


def claimable(session: Session, keys: Iterable[str], *, limit: int = 4) -> list[str]:
    """Some keys among these that a worker could claim now: pending, or running under a lapsed lease."""
    wanted = list(keys)
    now = utcnow()
    out: list[str] = []
    for start in range(0, len(wanted), 500):
        rows = session.execute(
            select(FleetCandidate.key)
            .where(
                FleetCandidate.key.in_(wanted[start : start + 500]),
                or_(
                    FleetCandidate.status == PENDING,
                    (FleetCandidate.status == RUNNING) & (FleetCandidate.lease_expires_at < now),
                ),
            )
            .limit(limit - len(out))
        )
        out.extend(rows.scalars())
        if len(out) >= limit:
            break
    return out
