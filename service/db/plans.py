"""Plan persistence: create with idempotency, read, list, cancel, and the worker's claim/progress/finish."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import FINAL_STATUSES, Plan, PlanStatus, utcnow


class IdempotencyConflictError(Exception):
    """The idempotency key was used before with another body."""


class PlanNotFoundError(Exception):
    """No plan has that id."""


class PlanStateError(Exception):
    """The plan is in a state that does not allow the operation."""


def release(session: Session) -> None:
    """End the read transaction so the connection goes back to the pool now, not when the request ends."""
    session.commit()


def spec_hash(spec: dict[str, Any]) -> str:
    """A stable digest of a spec document (key order does not matter)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class NewPlan:
    """What a submitted plan is: its spec, kind, summary labels and the work it will do."""

    spec: dict[str, Any]
    kind: str
    model: str
    gpu: str
    total: int


def create_plan(
    session: Session,
    *,
    new: NewPlan,
    idempotency_key: str | None,
    tenant_id: str = "local",
    admit: Callable[[Session], None] | None = None,
) -> tuple[Plan, bool]:
    """Insert a tenant's queued plan once `admit` (quotas) passes and commit; a known key and body replays."""
    spec, kind = new.spec, new.kind
    digest = spec_hash({"kind": kind, "spec": spec})
    if idempotency_key is not None:
        existing = _by_key(session, tenant_id, idempotency_key)
        release(session)
        if existing is not None:
            return _same_body(existing, digest), False
    if admit is not None:
        admit(session)
        release(session)
    now = utcnow()
    plan = Plan(
        id=str(uuid.uuid4()),
        kind=kind,
        status=PlanStatus.QUEUED,
        model=new.model,
        gpu=new.gpu,
        spec=spec,
        spec_hash=digest,
        idempotency_key=idempotency_key,
        tenant_id=tenant_id,
        created_at=now,
        updated_at=now,
        attempt=0,
        progress_done=0,
        progress_total=new.total,
    )
    session.add(plan)
    try:
        session.commit()
    except IntegrityError:
        # Two requests raced on one key: the loser answers with the winner's plan.
        session.rollback()
        existing = _by_key(session, tenant_id, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _same_body(existing, digest), False
    return plan, True


def _by_key(session: Session, tenant_id: str, key: str) -> Plan | None:
    return session.scalar(select(Plan).where(Plan.tenant_id == tenant_id, Plan.idempotency_key == key))


def _same_body(plan: Plan, digest: str) -> Plan:
    if plan.spec_hash != digest:
        raise IdempotencyConflictError
    return plan


def get_plan(session: Session, *, plan_id: str, tenant_id: str | None = None) -> Plan:
    """The plan with that id; with `tenant_id` only if that tenant owns it (else not found, as if absent)."""
    query = select(Plan).where(Plan.id == plan_id)
    if tenant_id is not None:
        query = query.where(Plan.tenant_id == tenant_id)
    plan = session.scalar(query)
    release(session)
    if plan is None:
        raise PlanNotFoundError(plan_id)
    return plan


@dataclass(frozen=True)
class PlanPage:
    """One page of plans, newest first, and the cursor of the next page."""

    items: list[Plan]
    next_cursor: int | None


def list_plans(
    session: Session,
    *,
    status: str | None = None,
    model: str | None = None,
    before_seq: int | None,
    limit: int,
    tenant_id: str | None = None,
) -> PlanPage:
    """Plans newest first, optionally filtered (by tenant too), starting after a cursor."""
    query = select(Plan).order_by(Plan.seq.desc()).limit(limit + 1)
    if tenant_id is not None:
        query = query.where(Plan.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Plan.status == status)
    if model is not None:
        query = query.where(Plan.model == model)
    if before_seq is not None:
        query = query.where(Plan.seq < before_seq)
    rows = list(session.scalars(query))
    release(session)
    more = len(rows) > limit
    items = rows[:limit]
    return PlanPage(items, items[-1].seq if more and items else None)


def cancel_plan(session: Session, *, plan_id: str, tenant_id: str | None = None) -> Plan:
    """Cancel a queued or running plan (of that tenant); a running worker notices at its next progress report."""
    plan = get_plan(session, plan_id=plan_id, tenant_id=tenant_id)
    now = utcnow()
    done = session.execute(
        update(Plan)
        .where(Plan.id == plan_id, Plan.status.in_([PlanStatus.QUEUED, PlanStatus.RUNNING]))
        .values(status=PlanStatus.CANCELED, finished_at=now, updated_at=now, lease_expires_at=None)
    )
    session.commit()
    if done.rowcount == 0:  # type: ignore[attr-defined]
        session.refresh(plan)
        if plan.status != PlanStatus.CANCELED:
            raise PlanStateError(f"plan {plan_id} already {plan.status}")
    session.refresh(plan)
    release(session)
    return plan


def mark_enqueued(session: Session, *, plan_id: str) -> None:
    """Record when the plan was last handed to an executor."""
    session.execute(update(Plan).where(Plan.id == plan_id).values(enqueued_at=utcnow()))
    session.commit()


def claim_plan(session: Session, *, plan_id: str, worker: str, lease_s: float, max_attempts: int) -> int | None:
    """Take a queued plan, or one whose lease expired, for this worker; the new attempt number or None."""
    now = utcnow()
    claimable = or_(
        Plan.status == PlanStatus.QUEUED,
        and_(Plan.status == PlanStatus.RUNNING, Plan.lease_expires_at < now),
    )
    result = session.execute(
        update(Plan)
        .where(Plan.id == plan_id, claimable, Plan.attempt < max_attempts)
        .values(
            status=PlanStatus.RUNNING,
            attempt=Plan.attempt + 1,
            worker=worker,
            lease_expires_at=now + timedelta(seconds=lease_s),
            started_at=func.coalesce(Plan.started_at, now),
            updated_at=now,
        )
    )
    session.commit()
    if result.rowcount != 1:  # type: ignore[attr-defined]
        _fail_exhausted(session, plan_id=plan_id, max_attempts=max_attempts)
        return None
    return int(session.scalar(select(Plan.attempt).where(Plan.id == plan_id)) or 0)


def _fail_exhausted(session: Session, *, plan_id: str, max_attempts: int) -> None:
    """A plan that keeps losing its worker is failed instead of retried forever."""
    now = utcnow()
    claimable = or_(
        Plan.status == PlanStatus.QUEUED,
        and_(Plan.status == PlanStatus.RUNNING, Plan.lease_expires_at < now),
    )
    detail = f"gave up after {max_attempts} attempts (worker lost or timed out each time)"
    session.execute(
        update(Plan)
        .where(Plan.id == plan_id, claimable, Plan.attempt >= max_attempts)
        .values(
            status=PlanStatus.FAILED,
            finished_at=now,
            updated_at=now,
            error={"type": "about:blank", "title": "Plan failed", "status": 500, "detail": detail},
        )
    )
    session.commit()


def record_progress(session: Session, *, plan_id: str, attempt: int, done: int, total: int, lease_s: float) -> bool:
    """Store progress and extend the lease; False when the plan was canceled or claimed by another attempt."""
    now = utcnow()
    result = session.execute(
        update(Plan)
        .where(Plan.id == plan_id, Plan.attempt == attempt, Plan.status == PlanStatus.RUNNING)
        .values(
            progress_done=done,
            progress_total=total,
            lease_expires_at=now + timedelta(seconds=lease_s),
            updated_at=now,
        )
    )
    session.commit()
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def renew_lease(session: Session, *, plan_id: str, attempt: int, lease_s: float) -> bool:
    """Extend the running attempt's lease; False when the plan was canceled or claimed by another attempt."""
    now = utcnow()
    result = session.execute(
        update(Plan)
        .where(Plan.id == plan_id, Plan.attempt == attempt, Plan.status == PlanStatus.RUNNING)
        .values(lease_expires_at=now + timedelta(seconds=lease_s))
    )
    session.commit()
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def finish_plan(
    session: Session,
    *,
    plan_id: str,
    attempt: int,
    result: dict[str, Any] | None,
    error: dict[str, Any] | None,
    summary: dict[str, Any] | None = None,
) -> bool:
    """Write the outcome if this attempt still owns the plan; False otherwise (nothing written)."""
    now = utcnow()
    started = session.scalar(select(Plan.started_at).where(Plan.id == plan_id))
    values: dict[str, Any] = {
        "status": PlanStatus.SUCCEEDED if error is None else PlanStatus.FAILED,
        "result": result,
        "error": error,
        "finished_at": now,
        "updated_at": now,
        "lease_expires_at": None,
        "run_s": (now - started).total_seconds() if started else None,
    }
    if summary:
        values.update(summary)
    outcome = session.execute(
        update(Plan)
        .where(Plan.id == plan_id, Plan.attempt == attempt, Plan.status == PlanStatus.RUNNING)
        .values(**values)
    )
    session.commit()
    return bool(outcome.rowcount == 1)  # type: ignore[attr-defined]


def plans_to_requeue(session: Session, *, queued_before: datetime, now: datetime, limit: int = 500) -> list[str]:
    """Plans stuck in queued since before a moment, or running with an expired lease."""
    stuck = or_(
        # A plan is handed over right after its insert commits, so judge it by its creation until then.
        and_(Plan.status == PlanStatus.QUEUED, func.coalesce(Plan.enqueued_at, Plan.created_at) < queued_before),
        and_(Plan.status == PlanStatus.RUNNING, Plan.lease_expires_at < now),
    )
    return list(session.scalars(select(Plan.id).where(stuck).order_by(Plan.seq).limit(limit)))


def count_by_status(session: Session) -> dict[str, int]:
    """How many plans are in each status."""
    counts = {status.value: 0 for status in PlanStatus}
    for status, count in session.execute(select(Plan.status, func.count()).group_by(Plan.status)):
        counts[str(status)] = int(count)
    return counts


def recent_run_times_s(session: Session, *, limit: int = 1000) -> list[float]:
    """Run times of the most recently finished plans."""
    query = (
        select(Plan.run_s)
        .where(Plan.run_s.is_not(None), Plan.status.in_(FINAL_STATUSES))
        .order_by(Plan.seq.desc())
        .limit(limit)
    )
    return [float(v) for v in session.scalars(query) if v is not None]
