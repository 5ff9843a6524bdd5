"""Placement holds (reservations kept beside the cluster document) and per-GPU claims.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create placement_holds and gpu_claims."""
    op.create_table(
        "placement_holds",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("cluster", sa.String(100), nullable=False),
        sa.Column("expires_at_s", sa.Float(), nullable=False),
        sa.Column("hold", sa.JSON(), nullable=False),
    )
    op.create_index("ix_placement_holds_cluster_expires", "placement_holds", ["cluster", "expires_at_s"])
    op.create_table(
        "gpu_claims",
        sa.Column("cluster", sa.String(100), primary_key=True),
        sa.Column("server", sa.String(200), primary_key=True),
        sa.Column("gpu_id", sa.Integer(), primary_key=True),
        sa.Column("hold_id", sa.String(64), nullable=False),
        sa.Column("expires_at_s", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    """Drop both tables."""
    op.drop_table("gpu_claims")
    op.drop_index("ix_placement_holds_cluster_expires", table_name="placement_holds")
    op.drop_table("placement_holds")
