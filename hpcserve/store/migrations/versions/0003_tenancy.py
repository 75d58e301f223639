"""tenancy: deployments' served model name (unique), account and shares; replica secrets and engine keys;
API keys; service state

``deployments.served_model_name`` is backfilled from each spec (its ``served_model_name``, else the name);
should two old deployments claim the same one, the older keeps it and the newer gets NULL (it is then
reached by its deployment name only, and its owner is told at the next ``serve``). Planner and autoscaler
state move from per-user files into ``service_state``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("served_model_name", sa.String(128), nullable=True))
        batch.add_column(sa.Column("account", sa.String(64), nullable=True))
        batch.add_column(sa.Column("shares", sa.JSON(), nullable=True))
    _backfill_served_names()
    op.create_index("ix_deployments_served_model_name", "deployments", ["served_model_name"], unique=True)
    with op.batch_alter_table("replicas") as batch:
        batch.add_column(sa.Column("secret_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("engine_key", sa.String(64), nullable=True))
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("label", sa.String(128), nullable=False),
        sa.Column("salt", sa.String(64), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("models", sa.JSON(), nullable=True),
        sa.Column("rate", sa.Double(), nullable=True),
        sa.Column("burst", sa.Double(), nullable=True),
        sa.Column("max_tokens", sa.Integer(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("revoked_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
    )
    op.create_index("ix_api_keys_owner", "api_keys", ["owner"])
    op.create_table(
        "service_state",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_service_state"),
    )


def _backfill_served_names() -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT name, spec FROM deployments ORDER BY created_at, name")).all()
    taken: set[str] = set()
    for name, spec in rows:
        spec = json.loads(spec) if isinstance(spec, str) else (spec or {})
        served = str(spec.get("served_model_name") or name)
        if served in taken:
            continue
        taken.add(served)
        conn.execute(
            sa.text("UPDATE deployments SET served_model_name = :served WHERE name = :name"),
            {"served": served, "name": name},
        )


def downgrade() -> None:
    op.drop_table("service_state")
    op.drop_index("ix_api_keys_owner", table_name="api_keys")
    op.drop_table("api_keys")
    with op.batch_alter_table("replicas", recreate="never") as batch:
        batch.drop_column("engine_key")
        batch.drop_column("secret_hash")
    op.drop_index("ix_deployments_served_model_name", table_name="deployments")
    with op.batch_alter_table("deployments", recreate="never") as batch:
        batch.drop_column("shares")
        batch.drop_column("account")
        batch.drop_column("served_model_name")
