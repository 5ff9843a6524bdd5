"""Tenant and API key persistence, and the counts that per-tenant quotas are judged on."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.models import ApiKey, Plan, PlanStatus, Tenant, utcnow


@dataclass(frozen=True)
class Quotas:
    """A tenant's limits, the settings' defaults filled in."""

    plans_in_flight: int
    plans_per_hour: int
    search_space: int


def ensure_tenant(session: Session, *, tenant: str) -> Tenant:
    """The tenant's row, created (with default quotas) when it does not exist yet; committed."""
    row = session.get(Tenant, tenant)
    if row is not None:
        return row
    session.add(Tenant(id=tenant, created_at=utcnow()))
    try:
        session.commit()
    except IntegrityError:  # created by a concurrent call
        session.rollback()
    found = session.get(Tenant, tenant)
    assert found is not None
    return found


def list_tenants(session: Session) -> list[Tenant]:
    """Every tenant, by id."""
    return list(session.scalars(select(Tenant).order_by(Tenant.id)))


def set_quotas(
    session: Session,
    *,
    tenant: str,
    plans_in_flight: int | None,
    plans_per_hour: int | None,
    search_space: int | None,
) -> Tenant:
    """Store the quotas given (None leaves one as it is); the tenant is created when new."""
    row = ensure_tenant(session, tenant=tenant)
    if plans_in_flight is not None:
        row.max_plans_in_flight = plans_in_flight
    if plans_per_hour is not None:
        row.max_plans_per_hour = plans_per_hour
    if search_space is not None:
        row.max_search_space = search_space
    session.commit()
    return row


def quotas(session: Session, *, tenant: str, defaults: Quotas) -> Quotas:
    """The tenant's quotas; the defaults where it has none of its own (or no row)."""
    row = session.get(Tenant, tenant)
    if row is None:
        return defaults
    return Quotas(
        plans_in_flight=row.max_plans_in_flight if row.max_plans_in_flight is not None else defaults.plans_in_flight,
        plans_per_hour=row.max_plans_per_hour if row.max_plans_per_hour is not None else defaults.plans_per_hour,
        search_space=row.max_search_space if row.max_search_space is not None else defaults.search_space,
    )


@dataclass(frozen=True)
class QuotaUsage:
    """What a tenant's quotas are judged on: plans queued or running, and plans submitted in the window."""

    in_flight: int
    since_count: int
    oldest_since: datetime | None


def lock_quotas(session: Session, *, tenant: str) -> None:
    """Hold the tenant's quota lock until the transaction ends, so two admissions cannot both take the last slot.

    PostgreSQL: a transaction-level advisory lock per tenant. SQLite: a no-op write takes the database's one write
    lock now, before the counts are read, instead of at the insert.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(f"splan-quota:{tenant}", 0))))
    else:
        session.execute(update(Tenant).where(Tenant.id == tenant).values(id=Tenant.id))


def quota_usage(session: Session, *, tenant: str, since: datetime) -> QuotaUsage:
    """The tenant's plans in flight, and how many it submitted since a moment and the oldest of those, in one query."""
    live = Plan.status.in_([PlanStatus.QUEUED, PlanStatus.RUNNING])
    recent = Plan.created_at >= since
    in_flight, count, oldest = session.execute(
        select(
            func.count().filter(live),
            func.count().filter(recent),
            func.min(Plan.created_at).filter(recent),
        ).where(Plan.tenant_id == tenant, or_(live, recent))
    ).one()
    return QuotaUsage(int(in_flight or 0), int(count or 0), oldest)


def add_key(session: Session, *, key_id: str, tenant: str, digest: str, scopes: list[str], label: str | None) -> ApiKey:
    """Store a key's digest for a tenant (created when new); committed."""
    ensure_tenant(session, tenant=tenant)
    key = ApiKey(id=key_id, tenant_id=tenant, secret_sha256=digest, scopes=scopes, label=label, created_at=utcnow())
    session.add(key)
    session.commit()
    return key


def list_keys(session: Session, *, tenant: str | None = None) -> list[ApiKey]:
    """Keys (revoked ones included), oldest first, optionally of one tenant."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if tenant is not None:
        query = query.where(ApiKey.tenant_id == tenant)
    return list(session.scalars(query))


def revoke_key(session: Session, *, key_id: str) -> ApiKey | None:
    """Mark the key revoked (idempotent); None when no key has that id."""
    session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow()))
    session.commit()
    return session.get(ApiKey, key_id)


def live_key(session: Session, *, key_id: str) -> ApiKey | None:
    """The key with that id unless it was revoked; the read transaction ends here."""
    key = session.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)))
    session.commit()
    return key
