"""SQLAlchemy models: plans (with idempotency keys, leases and attempts) and cluster states."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, TypeDecorator, UniqueConstraint
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class PlanStatus(StrEnum):
    """Life cycle of a plan."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


FINAL_STATUSES = (PlanStatus.SUCCEEDED, PlanStatus.FAILED, PlanStatus.CANCELED)


class Base(DeclarativeBase):
    """Declarative base of every table."""


class Plan(Base):
    """One planning job: its spec, its execution state and its result."""

    __tablename__ = "plans"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True, index=True)
    kind: Mapped[str] = mapped_column(String(16), default="strategy")
    status: Mapped[str] = mapped_column(String(16), index=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    gpu: Mapped[str] = mapped_column(String(100))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    spec_hash: Mapped[str] = mapped_column(String(64))
    tenant_id: Mapped[str] = mapped_column(String(64), default="local", server_default="local")
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True, index=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    run_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    best_goodput_rps: Mapped[float | None] = mapped_column(Float, nullable=True)
    best_gpus: Mapped[int | None] = mapped_column(Integer, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    # Idempotency keys are the tenant's own: another tenant's key neither replays nor conflicts with them.
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_plans_tenant_idempotency_key"),
        Index("ix_plans_tenant_status", "tenant_id", "status"),
        Index("ix_plans_tenant_created", "tenant_id", "created_at"),
    )


class Tenant(Base):
    """A tenant: owner of plans, clusters and keys, with its quotas (None: the settings' default)."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    max_plans_in_flight: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_plans_per_hour: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_search_space: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ApiKey(Base):
    """An API key: its public id, the SHA-256 of its secret (never the secret), tenant and scopes."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), ForeignKey("tenants.id"), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    label: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class ClusterState(Base):
    """The latest state of one named cluster, versioned for optimistic concurrency (If-Match)."""

    __tablename__ = "clusters"

    # The storage key (service.auth.cluster_key): the name for the default tenant, `tenant/name` for the others,
    # so that holds and GPU claims, keyed by it, belong to the cluster's tenant too.
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class PlacementHold(Base):
    """A placement reservation kept beside the cluster document until confirmed, released or expired."""

    __tablename__ = "placement_holds"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    cluster: Mapped[str] = mapped_column(String(200))
    expires_at_s: Mapped[float] = mapped_column(Float)
    hold: Mapped[dict[str, Any]] = mapped_column(JSON)

    __table_args__ = (Index("ix_placement_holds_cluster_expires", "cluster", "expires_at_s"),)


class GpuClaim(Base):
    """One GPU held by a placement: the primary key makes two holds on one GPU impossible."""

    __tablename__ = "gpu_claims"

    cluster: Mapped[str] = mapped_column(String(200), primary_key=True)
    server: Mapped[str] = mapped_column(String(200), primary_key=True)
    gpu_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hold_id: Mapped[str] = mapped_column(String(64))
    expires_at_s: Mapped[float] = mapped_column(Float)


class FleetCandidate(Base):
    """One fleet candidate search, keyed by the content hash of what it searched: pending, running (claimed
    under a lease), done (with its result) or failed."""

    __tablename__ = "fleet_candidates"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    search_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
