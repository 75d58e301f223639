"""gateway samples name their gateway (engine_samples.source): the autoscaler sums every live gateway

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("engine_samples", sa.Column("source", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("engine_samples", recreate="never") as batch:
        batch.drop_column("source")
