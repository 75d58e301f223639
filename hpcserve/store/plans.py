"""Rebalance plans and their steps. Every call is its own transaction, so what an executor recorded survives
a crash and it resumes from the first step that is not done."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, insert, literal, update

from hpcserve.store.errors import NotFound
from hpcserve.store.records import (
    FINAL_PLAN_STATES,
    PLAN_STATES,
    STEP_KINDS,
    STEP_STATES,
    NewStep,
    Plan,
    Step,
    check_state,
)
from hpcserve.store.schema import RebalancePlanRow, RebalanceStepRow, UtcDateTime
from hpcserve.store.sql import select_record, to_records

P, S = RebalancePlanRow, RebalanceStepRow
FINISHED = frozenset({"done", "failed"})


def create_plan(
    conn: Connection, reason: str, moves: Sequence[Mapping[str, Any]], steps: Sequence[NewStep],
    state: str, now: datetime, holder: str | None = None,
) -> int:  # fmt: skip
    check_state("plan state", state, PLAN_STATES)
    values = {"reason": reason, "moves": [dict(m) for m in moves], "state": state, "created_at": now,
              "updated_at": now, "finished_at": now if state in FINAL_PLAN_STATES else None,
              "holder": holder}  # fmt: skip
    plan_id: int = conn.execute(insert(P).values(values).returning(P.id)).scalar_one()
    if steps:
        conn.execute(insert(S), [_step_row(plan_id, seq, step) for seq, step in enumerate(steps)])
    return plan_id


def _step_row(plan_id: int, seq: int, step: NewStep) -> dict[str, Any]:
    check_state("step kind", step.kind, STEP_KINDS)
    return {"plan_id": plan_id, "seq": seq, "node": step.node, "src": step.src, "dst": step.dst,
            "kind": step.kind, "state": "todo", "started_at": None, "finished_at": None,
            "detail": step.detail}  # fmt: skip


def plans(
    conn: Connection, state: str | None, plan_id: int | None = None, last: int | None = None
) -> list[Plan]:
    """Plans oldest first: those in ``state``, the one ``plan_id``, or (``last``) only the newest ones."""
    stmt = select_record(P, Plan).order_by(P.id.desc())
    if state is not None:
        stmt = stmt.where(P.state == state)
    if plan_id is not None:
        stmt = stmt.where(P.id == plan_id)
    if last is not None:
        stmt = stmt.limit(last)
    return to_records(conn.execute(stmt), Plan)[::-1]


def done_moves(conn: Connection) -> list[Step]:
    """Every move step carried out, oldest plan first, in step order."""
    stmt = select_record(S, Step).where(S.kind == "move", S.state == "done").order_by(S.plan_id, S.seq)
    return to_records(conn.execute(stmt), Step)


def steps(conn: Connection, plan_id: int, seq: int | None = None) -> list[Step]:
    stmt = select_record(S, Step).where(S.plan_id == plan_id).order_by(S.seq)
    if seq is not None:
        stmt = stmt.where(S.seq == seq)
    return to_records(conn.execute(stmt), Step)


def start_step(conn: Connection, plan_id: int, seq: int, now: datetime) -> Step:
    return _set_step(conn, plan_id, seq, {"started_at": now, "finished_at": None}, now)


def mark_step(conn: Connection, plan_id: int, seq: int, state: str, detail: str, now: datetime) -> Step:
    check_state("step state", state, STEP_STATES)
    finished = now if state in FINISHED else None
    return _set_step(conn, plan_id, seq, {"state": state, "detail": detail, "finished_at": finished}, now)


def _set_step(conn: Connection, plan_id: int, seq: int, values: dict[str, Any], now: datetime) -> Step:
    stmt = update(S).where(S.plan_id == plan_id, S.seq == seq).values(values)
    if conn.execute(stmt).rowcount == 0:
        raise NotFound(f"rebalance plan {plan_id} has no step {seq}")
    conn.execute(update(P).where(P.id == plan_id).values(updated_at=now))
    return steps(conn, plan_id, seq)[0]


def set_plan_state(
    conn: Connection, plan_id: int, state: str, now: datetime, holder: str | None = None
) -> None:
    """Set the state (and ``holder`` unless None). Entering a final state sets ``finished_at``; a plan that
    was already final keeps its own, and leaving the final states clears it."""
    check_state("plan state", state, PLAN_STATES)
    finished = (
        func.coalesce(P.finished_at, literal(now, UtcDateTime())) if state in FINAL_PLAN_STATES else None
    )
    values: dict[str, Any] = {"state": state, "updated_at": now, "finished_at": finished}
    if holder is not None:
        values["holder"] = holder
    stmt = update(P).where(P.id == plan_id).values(values)
    if conn.execute(stmt).rowcount == 0:
        raise NotFound(f"no rebalance plan {plan_id}")
