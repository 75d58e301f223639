"""Residency tiers, model pools and measured starts: a deployment's tier, a pool replica's engines, a
replica's start phases

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("deployments", sa.Column("tier", sa.String(8), nullable=True))
    op.add_column("deployments", sa.Column("tier_since", TIMESTAMP, nullable=True))
    op.add_column("replicas", sa.Column("models", sa.JSON(), nullable=True))
    op.add_column("replicas", sa.Column("phases", sa.JSON(), nullable=True))


def downgrade() -> None:  # ALTER TABLE ... DROP COLUMN: SQLite's table copy would cascade the replicas away
    with op.batch_alter_table("replicas", recreate="never") as batch:
        batch.drop_column("phases")
        batch.drop_column("models")
    with op.batch_alter_table("deployments", recreate="never") as batch:
        batch.drop_column("tier_since")
        batch.drop_column("tier")
