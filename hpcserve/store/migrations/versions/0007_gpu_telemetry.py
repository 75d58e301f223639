"""GPU telemetry: one row per reading of one GPU of a job (the in-job NVML sampler, or sacct's gres/gpuutil)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime(timezone=True)
ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "gpu_samples",
        sa.Column("id", ROW_ID, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("deployment", sa.String(128), nullable=True),
        sa.Column("at", TIMESTAMP, nullable=False),
        sa.Column("gpu_uuid", sa.String(96), nullable=False),
        sa.Column("gpu_index", sa.Integer(), nullable=False),
        sa.Column("util_pct", sa.Double(), nullable=False),
        sa.Column("mem_used_bytes", sa.BigInteger(), nullable=False),
        sa.Column("mem_total_bytes", sa.BigInteger(), nullable=False),
        sa.Column("power_w", sa.Double(), nullable=True),
        sa.Column("sm_clock_mhz", sa.Integer(), nullable=True),
        sa.Column("source", sa.String(8), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_gpu_samples"),
    )
    op.create_index("ix_gpu_samples_job_id_at", "gpu_samples", ["job_id", "at"])
    op.create_index("ix_gpu_samples_at", "gpu_samples", ["at"])


def downgrade() -> None:
    op.drop_index("ix_gpu_samples_at", table_name="gpu_samples")
    op.drop_index("ix_gpu_samples_job_id_at", table_name="gpu_samples")
    op.drop_table("gpu_samples")
