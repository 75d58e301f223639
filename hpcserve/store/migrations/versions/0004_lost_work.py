"""lost work: the training jobs hpcserve evicted for replicas (lending: overlap) and the GPU-seconds each lost

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime(timezone=True)
ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "lost_work",
        sa.Column("id", ROW_ID, autoincrement=True, nullable=False),
        sa.Column("at", TIMESTAMP, nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("node", sa.String(128), nullable=False),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("lost_gpu_s", sa.Double(), nullable=False),
        sa.Column("deployment", sa.String(128), nullable=False),
        sa.Column("replica_job_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_lost_work"),
    )
    op.create_index("ix_lost_work_at", "lost_work", ["at"])
    op.create_index("ix_lost_work_job_id", "lost_work", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_lost_work_job_id", table_name="lost_work")
    op.drop_index("ix_lost_work_at", table_name="lost_work")
    op.drop_table("lost_work")
