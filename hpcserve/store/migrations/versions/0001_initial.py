"""initial schema: samples, rollups, deployments, replicas, rebalance plans, usage, locks

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen copies of the column types this revision creates: later schema changes need a new revision.
TIMESTAMP = sa.DateTime(timezone=True)
SAMPLE_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
QUEUE_FIELDS = ("pending_jobs", "pending_gpus", "running_gpus", "idle_gpus", "total_gpus")
ENGINE_INTS = ("waiting", "running")
ENGINE_FLOATS = ("kv_usage", "ttft_p50", "ttft_p95", "tokens_per_s")
ENGINE_FIELDS = (*ENGINE_INTS, *ENGINE_FLOATS, "gateway_waiting")


def _name(table: str, kind: str, *columns: str) -> str:
    return op.f(f"{kind}_{table}_{'_'.join(columns)}" if columns else f"{kind}_{table}")


def _cascade(table: str, column: str, parent: str, parent_column: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], [f"{parent}.{parent_column}"], ondelete="CASCADE", name=_name(table, "fk", column, parent)
    )


def _stats(fields: tuple[str, ...]) -> list[sa.Column[float]]:
    return [sa.Column(f"{stat}_{f}", sa.Double(), nullable=True) for f in fields for stat in ("avg", "max")]


def _samples_table(table: str, key: str, *columns: sa.Column[Any]) -> None:
    op.create_table(
        table,
        sa.Column("id", SAMPLE_ID, autoincrement=True, nullable=False),
        sa.Column("at", TIMESTAMP, nullable=False),
        sa.Column(key, sa.String(128), nullable=False),
        *columns,
        sa.PrimaryKeyConstraint("id", name=_name(table, "pk")),
    )
    op.create_index(_name(table, "ix", key, "at"), table, [key, "at"])
    op.create_index(_name(table, "ix", "at"), table, ["at"])


def _rollup_table(table: str, key: str, fields: tuple[str, ...]) -> None:
    op.create_table(
        table,
        sa.Column(key, sa.String(128), nullable=False),
        sa.Column("bucket_start", TIMESTAMP, nullable=False),
        sa.Column("bucket_s", sa.Integer(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        *_stats(fields),
        sa.PrimaryKeyConstraint(key, "bucket_start", "bucket_s", name=_name(table, "pk")),
    )


def _history() -> None:
    _samples_table(
        "queue_samples", "partition", *(sa.Column(f, sa.Integer(), nullable=False) for f in QUEUE_FIELDS)
    )
    _samples_table(
        "engine_samples",
        "deployment",
        sa.Column("replica", sa.Integer(), nullable=True),
        *(sa.Column(f, sa.Integer(), nullable=True) for f in ENGINE_INTS),
        *(sa.Column(f, sa.Double(), nullable=True) for f in ENGINE_FLOATS),
        sa.Column("gateway_waiting", sa.Integer(), nullable=True),
    )
    _rollup_table("queue_rollups", "partition", QUEUE_FIELDS)
    _rollup_table("engine_rollups", "deployment", ENGINE_FIELDS)


def _serving() -> None:
    op.create_table(
        "deployments",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("desired_replicas", sa.Integer(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("deleted_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("name", name=_name("deployments", "pk")),
    )
    op.create_table(
        "replicas",
        sa.Column("deployment", sa.String(128), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=True),
        sa.Column("job_id", sa.String(64), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("url", sa.String(512), nullable=True),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("ready_at", TIMESTAMP, nullable=True),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        _cascade("replicas", "deployment", "deployments", "name"),
        sa.PrimaryKeyConstraint("deployment", "index", name=_name("replicas", "pk")),
    )
    op.create_table(
        "usage",
        sa.Column("key_id", sa.String(128), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key_id", "model", "day", name=_name("usage", "pk")),
    )


def _control() -> None:
    op.create_table(
        "rebalance_plans",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("moves", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=_name("rebalance_plans", "pk")),
    )
    op.create_table(
        "rebalance_steps",
        sa.Column("plan_id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        *(sa.Column(c, sa.String(128), nullable=False) for c in ("node", "src", "dst")),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        _cascade("rebalance_steps", "plan_id", "rebalance_plans", "id"),
        sa.PrimaryKeyConstraint("plan_id", "seq", name=_name("rebalance_steps", "pk")),
    )
    op.create_table(
        "locks",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("expires_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("name", name=_name("locks", "pk")),
    )


def upgrade() -> None:
    _history()
    _serving()
    _control()


def downgrade() -> None:
    for table in ("locks", "rebalance_steps", "rebalance_plans", "usage", "replicas", "deployments"):
        op.drop_table(table)
    for table in ("engine_rollups", "queue_rollups", "engine_samples", "queue_samples"):
        op.drop_table(table)  # drops the table's indexes with it
