"""Named decision state that the service carries between ticks (table ``service_state``), so that a restarted
or standby service, or ``hpcserve rebalance --apply`` from cron, starts where the last one left off.

Names in use: ``rebalance:planner`` (the planner's hysteresis memory), ``scaler:<deployment>`` (each
autoscaler's). The store keeps a JSON object per name and nothing else: the typed value is encoded and decoded
by its owner at the boundary (``PlannerState.to_json``/``from_json``), so decisions never see a raw mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, select

from hpcserve.store.errors import StoreError
from hpcserve.store.schema import ServiceStateRow
from hpcserve.store.sql import dialect_insert

S = ServiceStateRow
MAX_NAME = 128  # the column's width


def get_state(conn: Connection, name: str) -> dict[str, Any] | None:
    data = conn.execute(select(S.data).where(S.name == name)).scalar_one_or_none()
    return dict(data) if isinstance(data, dict) else None


def states(conn: Connection, prefix: str) -> dict[str, dict[str, Any]]:
    """Every state whose name starts with ``prefix`` (e.g. ``"scaler:"``), by name."""
    rows = conn.execute(select(S.name, S.data).where(S.name.startswith(prefix, autoescape=True)))
    return {name: dict(data) for name, data in rows if isinstance(data, dict)}


def put_state(conn: Connection, name: str, data: Mapping[str, Any], now: datetime) -> None:
    """Insert or replace the state ``name`` (one atomic upsert)."""
    _check(name, data)
    insert = dialect_insert(conn, S).values(name=name, data=dict(data), updated_at=now)
    conn.execute(
        insert.on_conflict_do_update(
            index_elements=["name"],
            set_={"data": insert.excluded.data, "updated_at": insert.excluded.updated_at},
        )
    )


def delete_state(conn: Connection, name: str) -> bool:
    return conn.execute(delete(S).where(S.name == name)).rowcount > 0


def _check(name: str, data: Mapping[str, Any]) -> None:
    if not name or len(name) > MAX_NAME:
        raise StoreError(f"state name {name!r}: must be 1 to {MAX_NAME} characters")
    if not isinstance(data, Mapping):
        raise StoreError(f"state {name!r}: must be a JSON object, not {type(data).__name__}")
