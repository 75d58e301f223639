"""plan bookkeeping for crash recovery: rebalance_plans.finished_at and rebalance_plans.holder

``finished_at``: when the plan reached a final state (done, failed, aborted); plans already final are
backfilled with the latest ``finished_at`` of their steps, else their ``updated_at``. ``holder``: the process
("host:pid", the rebalance lease holder) that last ran the plan; unknown (NULL) for older plans.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Frozen copies of what this revision knows: later schema changes need a new revision.
TIMESTAMP = sa.DateTime(timezone=True)
# The final plan states as of this revision. Portable SQL (SQLite and PostgreSQL): MAX skips steps that never
# finished; on SQLite it compares the stored text, whose one zone-less format orders like the instants.
BACKFILL = sa.text(
    "UPDATE rebalance_plans SET finished_at = COALESCE("
    "(SELECT MAX(s.finished_at) FROM rebalance_steps s WHERE s.plan_id = rebalance_plans.id), updated_at) "
    "WHERE state IN ('done', 'failed', 'aborted') AND finished_at IS NULL"
)


def upgrade() -> None:
    with op.batch_alter_table("rebalance_plans") as batch:  # SQLite adds columns in place (no copy)
        batch.add_column(sa.Column("finished_at", TIMESTAMP, nullable=True))
        batch.add_column(sa.Column("holder", sa.String(255), nullable=True))
    op.execute(BACKFILL)


def downgrade() -> None:
    # Never copy the table on SQLite: dropping the old rebalance_plans (foreign keys on) would cascade and
    # delete every rebalance step. Native DROP COLUMN needs SQLite 3.35 (2021) or later.
    with op.batch_alter_table("rebalance_plans", recreate="never") as batch:
        batch.drop_column("holder")
        batch.drop_column("finished_at")
