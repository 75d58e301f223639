"""API keys carry a priority class (interactive, batch) and whether they allow a fallback deployment

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "api_keys", sa.Column("priority", sa.String(16), nullable=False, server_default="interactive")
    )
    op.add_column(
        "api_keys", sa.Column("allow_fallback", sa.Boolean(), nullable=False, server_default=sa.false())
    )


def downgrade() -> None:
    with op.batch_alter_table("api_keys", recreate="never") as batch:
        batch.drop_column("allow_fallback")
        batch.drop_column("priority")
