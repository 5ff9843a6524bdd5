"""Tenants (with quotas), API keys (SHA-256 of the secret only), plans owned by a tenant, tenant cluster keys.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

DEFAULT_TENANT = "local"


def upgrade() -> None:
    """Create tenants and api_keys; every existing plan and cluster goes to the default tenant."""
    ts = sa.DateTime(timezone=True)
    tenants = op.create_table(
        "tenants",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("max_plans_in_flight", sa.Integer(), nullable=True),
        sa.Column("max_plans_per_hour", sa.Integer(), nullable=True),
        sa.Column("max_search_space", sa.Integer(), nullable=True),
    )
    op.bulk_insert(tenants, [{"id": DEFAULT_TENANT, "created_at": datetime.now(UTC)}])
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("label", sa.String(200), nullable=True),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("revoked_at", ts, nullable=True),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])
    # Batch mode: SQLite cannot drop a constraint in place, so the table is copied.
    with op.batch_alter_table("plans") as batch:
        batch.add_column(sa.Column("tenant_id", sa.String(64), nullable=False, server_default=DEFAULT_TENANT))
        batch.drop_constraint("uq_plans_idempotency_key", type_="unique")
        batch.create_unique_constraint("uq_plans_tenant_idempotency_key", ["tenant_id", "idempotency_key"])
    op.create_index("ix_plans_tenant_status", "plans", ["tenant_id", "status"])
    op.create_index("ix_plans_tenant_created", "plans", ["tenant_id", "created_at"])
    # Cluster keys of other tenants are `tenant/name`; existing names stay the default tenant's.
    for table, column in (("clusters", "name"), ("placement_holds", "cluster"), ("gpu_claims", "cluster")):
        with op.batch_alter_table(table) as batch:
            batch.alter_column(column, type_=sa.String(200), existing_type=sa.String(100), existing_nullable=False)


def downgrade() -> None:
    """Drop tenants and keys; plans lose their tenant (idempotency keys global again)."""
    for table, column in (("gpu_claims", "cluster"), ("placement_holds", "cluster"), ("clusters", "name")):
        with op.batch_alter_table(table) as batch:
            batch.alter_column(column, type_=sa.String(100), existing_type=sa.String(200), existing_nullable=False)
    op.drop_index("ix_plans_tenant_created", table_name="plans")
    op.drop_index("ix_plans_tenant_status", table_name="plans")
    with op.batch_alter_table("plans") as batch:
        batch.drop_constraint("uq_plans_tenant_idempotency_key", type_="unique")
        batch.create_unique_constraint("uq_plans_idempotency_key", ["idempotency_key"])
        batch.drop_column("tenant_id")
    op.drop_index("ix_api_keys_tenant_id", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
