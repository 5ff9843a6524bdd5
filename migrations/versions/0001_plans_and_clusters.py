"""Plans (idempotency keys, leases, attempts, results) and cluster states.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the plans and clusters tables."""
    ts = sa.DateTime(timezone=True)
    op.create_table(
        "plans",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("gpu", sa.String(100), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("spec_hash", sa.String(64), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("created_at", ts, nullable=False),
        sa.Column("updated_at", ts, nullable=False),
        sa.Column("started_at", ts, nullable=True),
        sa.Column("finished_at", ts, nullable=True),
        sa.Column("enqueued_at", ts, nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("lease_expires_at", ts, nullable=True),
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("progress_done", sa.Integer(), nullable=False),
        sa.Column("progress_total", sa.Integer(), nullable=False),
        sa.Column("run_s", sa.Float(), nullable=True),
        sa.Column("best_goodput_rps", sa.Float(), nullable=True),
        sa.Column("best_gpus", sa.Integer(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.UniqueConstraint("idempotency_key", name="uq_plans_idempotency_key"),
    )
    op.create_index("ix_plans_id", "plans", ["id"], unique=True)
    op.create_index("ix_plans_status", "plans", ["status"])
    op.create_index("ix_plans_model", "plans", ["model"])
    op.create_index("ix_plans_lease_expires_at", "plans", ["lease_expires_at"])
    op.create_table(
        "clusters",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("updated_at", ts, nullable=False),
    )


def downgrade() -> None:
    """Drop both tables."""
    op.drop_table("clusters")
    op.drop_index("ix_plans_lease_expires_at", table_name="plans")
    op.drop_index("ix_plans_model", table_name="plans")
    op.drop_index("ix_plans_status", table_name="plans")
    op.drop_index("ix_plans_id", table_name="plans")
    op.drop_table("plans")
