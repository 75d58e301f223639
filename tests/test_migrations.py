"""Migrations upgrade an old database: a database at 0001 holding what a 0001-era hpcserve wrote (samples,
a deployment and its replica, rebalance plans in every state with their steps, usage, a lease) is brought
to head through ``HistoryStore.upgrade()`` and ``hpcserve db upgrade``, on SQLite and on PostgreSQL. Its data
stays readable, 0002 backfills when the finished plans finished, and a downgrade keeps the data too."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import JSON, Connection, Date, DateTime, bindparam, func, inspect, select, table, text
from sqlalchemy.types import TypeEngine

from hpcserve.store import Deployment, EngineSample, HistoryStore, QueueSample, Replica, Step, Usage, migrate
from hpcserve.store.migrate import alembic_config, head_revision
from hpcserve.store.schema import Base
from tests.store_helpers import BACKENDS, empty_database, hpcserve

OLD = "0001"
T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
LATER = T0 + timedelta(hours=1)  # the upgraded store's clock


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def plan(plan_id: int, state: str, updated: float) -> dict[str, Any]:
    moves = [{"node": f"node{plan_id}", "src": "inference", "dst": "training", "reason": "r", "grace_s": 30}]
    return {"created_at": T0, "updated_at": at(updated), "state": state, "reason": f"plan {plan_id}",
            "moves": moves}  # fmt: skip


def step(plan_id: int, seq: int, kind: str, state: str, finished: float | None) -> dict[str, Any]:
    started, ended = (None, None) if finished is None else (at(finished - 5), at(finished))
    return {"plan_id": plan_id, "seq": seq, "node": f"node{plan_id}", "src": "inference", "dst": "training",
            "kind": kind, "state": state, "started_at": started, "finished_at": ended,
            "detail": f"{kind} {state}"}  # fmt: skip


# What a 0001-era hpcserve left, table by table in foreign-key order. Plans (ids from the database, as
# hpcserve let it number them): 1 done, 2 running (a crashed run), 3 failed, 4 aborted before any step ended.
OLD_ROWS: dict[str, list[dict[str, Any]]] = {
    "queue_samples": [
        {"at": T0, "partition": "train", "pending_jobs": 3, "pending_gpus": 6, "running_gpus": 8,
         "idle_gpus": 0, "total_gpus": 8},
        {"at": at(60), "partition": "infer", "pending_jobs": 0, "pending_gpus": 0, "running_gpus": 2,
         "idle_gpus": 6, "total_gpus": 8},
    ],
    "engine_samples": [
        {"at": T0, "deployment": "llama", "replica": 0, "waiting": 2, "running": 1, "kv_usage": 0.25,
         "ttft_p50": 0.1, "ttft_p95": 0.4, "tokens_per_s": 900.0, "gateway_waiting": None},
    ],
    "deployments": [
        {"name": "llama", "owner": "alice", "spec": {"model": "meta/llama", "gpus": 1}, "generation": 2,
         "desired_replicas": 1, "created_at": T0, "updated_at": at(300), "deleted_at": None},
    ],
    "replicas": [
        {"deployment": "llama", "index": 0, "generation": 2, "job_id": "101", "state": "ready",
         "url": "http://n1:8000", "host": "n1", "port": 8000, "started_at": at(10), "ready_at": at(120),
         "updated_at": at(120)},
    ],
    "rebalance_plans": [
        plan(1, "done", 40), plan(2, "running", 50), plan(3, "failed", 90), plan(4, "aborted", 240),
    ],
    "rebalance_steps": [
        step(1, 0, "drain", "done", 10), step(1, 1, "move", "done", 30), step(1, 2, "resume", "done", 20),
        step(2, 0, "drain", "done", 50), step(2, 1, "move", "todo", None),
        step(3, 0, "drain", "done", 70), step(3, 1, "wait", "failed", 80), step(3, 2, "move", "todo", None),
        step(4, 0, "drain", "todo", None),
    ],
    "usage": [
        {"key_id": "key1", "model": "llama", "day": date(2026, 3, 2), "requests": 5, "prompt_tokens": 500,
         "completion_tokens": 50},
    ],
    "locks": [{"name": "leader", "holder": "host9:99", "expires_at": LATER + timedelta(hours=1)}],
}  # fmt: skip
# (state, finished_at) after 0002: the latest step that finished, else the plan's updated_at; NULL if running
BACKFILLED = [("done", at(30)), ("running", None), ("failed", at(80)), ("aborted", at(240))]


def bind_type(values: list[Any]) -> TypeEngine[Any] | None:
    """The column type 0001 gave values like these (how that hpcserve bound them), or None: the driver's."""
    kinds = {type(v) for v in values if v is not None}
    if datetime in kinds:
        return DateTime(timezone=True)
    if date in kinds:
        return Date()
    return JSON() if kinds & {dict, list} else None


def insert(conn: Connection, name: str, rows: list[dict[str, Any]]) -> None:
    """Plain SQL INSERTs of ``rows`` (column names quoted: replicas has one called "index")."""
    names = list(rows[0])
    quoted, values = ", ".join(f'"{n}"' for n in names), ", ".join(f":{n}" for n in names)
    stmt = text(f"INSERT INTO {name} ({quoted}) VALUES ({values})")  # noqa: S608 (the test's own names)
    typed = {n: bind_type([row[n] for row in rows]) for n in names}
    conn.execute(stmt.bindparams(*(bindparam(n, type_=t) for n, t in typed.items() if t is not None)), rows)


@pytest.fixture(params=BACKENDS)
def old_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database at revision 0001, filled as hpcserve 0001 would have."""
    with empty_database(request.param, tmp_path) as url:
        with HistoryStore(url) as store:
            assert migrate.upgrade(store.engine, OLD) == OLD
            with store.engine.begin() as conn:
                for table, rows in OLD_ROWS.items():
                    insert(conn, table, rows)
        yield url


def assert_old_data_intact(store: HistoryStore) -> None:
    """Every old row reads back through the store's API as it was written."""
    assert store.queue_samples() == [QueueSample(**row) for row in OLD_ROWS["queue_samples"]]
    assert store.engine_samples("llama") == [EngineSample(**row) for row in OLD_ROWS["engine_samples"]]
    # 0003 backfills each deployment's served model name from its spec, else its name
    assert store.list_deployments() == [
        Deployment(**row, served_model_name=row["spec"].get("served_model_name") or row["name"])
        for row in OLD_ROWS["deployments"]
    ]
    assert store.replicas() == [Replica(**row) for row in OLD_ROWS["replicas"]]
    assert store.usage() == [Usage(**row) for row in OLD_ROWS["usage"]]
    for plan_id, row in enumerate(OLD_ROWS["rebalance_plans"], start=1):
        found = store.plan(plan_id)
        assert found is not None
        assert (found.created_at, found.updated_at, found.state, found.reason, found.moves) == (
            row["created_at"], row["updated_at"], row["state"], row["reason"], row["moves"],
        )  # fmt: skip
        steps = [Step(**s) for s in OLD_ROWS["rebalance_steps"] if s["plan_id"] == plan_id]
        assert store.steps(plan_id) == steps
    assert store.try_lock("leader", "intruder", 30, LATER) is False  # host9:99's lease still holds


def assert_models_match(store: HistoryStore) -> None:
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def upgrade_with_cli(url: str) -> None:
    done = hpcserve("db", "upgrade", "--url", url)
    assert done.returncode == 0 and f"upgraded from {OLD} to {head_revision()}" in done.stdout, done.stderr


@pytest.mark.parametrize("via", ["store", "cli"])
def test_an_old_database_upgrades_with_its_data(old_url: str, via: str) -> None:
    with HistoryStore(old_url, admins={"root"}, clock=lambda: LATER) as store:
        assert store.schema_status().current == OLD and not store.schema_status().up_to_date
        if via == "cli":
            upgrade_with_cli(old_url)
        else:
            assert store.upgrade() == head_revision()
        assert store.schema_status().up_to_date
        assert_old_data_intact(store)
        assert [(p.state, p.finished_at) for p in store.plans()] == BACKFILLED
        assert {p.holder for p in store.plans()} == {None}  # not recorded before 0002
        assert_models_match(store)
        assert_new_writes_work(store)


def assert_new_writes_work(store: HistoryStore) -> None:
    store.set_plan_state(2, "running", holder="host2:22")  # a new hpcserve resumes the crashed plan
    store.mark_step(2, 1, "done", "moved")
    store.set_plan_state(2, "done")
    resumed = store.plan(2)
    assert resumed is not None and (resumed.finished_at, resumed.holder) == (LATER, "host2:22")
    new_id = store.create_plan("new", [], [], holder="host2:22")
    assert new_id == 5 and store.steps(2)[1].finished_at == LATER  # ids go on after the old plans
    store.add_queue_samples([QueueSample(LATER, "train", 0, 0, 8, 0, 8)])
    assert len(store.queue_samples()) == 3
    assert store.set_desired("llama", 2, user="alice").desired_replicas == 2
    store.upsert_replica("llama", 1, job_id="102")
    store.add_usage("key1", "llama", date(2026, 3, 2), 1, 10, 1)
    assert store.usage()[0].requests == 6


def test_a_downgrade_to_0001_keeps_the_data_and_upgrades_again(old_url: str) -> None:
    with HistoryStore(old_url, clock=lambda: LATER) as store:
        store.upgrade()
        store.create_plan("made after 0002", [], [], state="done", holder="host2:22")
        with store.engine.begin() as conn:
            command.downgrade(alembic_config(conn), OLD)
        assert store.schema_status().current == OLD
        columns = {c["name"] for c in inspect(store.engine).get_columns("rebalance_plans")}
        assert columns == {"id", "created_at", "updated_at", "state", "reason", "moves"}
        with store.engine.connect() as conn:  # every row is still there, the steps of every plan too
            counts = {t: conn.execute(select(func.count()).select_from(table(t))).scalar() for t in OLD_ROWS}
        assert counts == {t: len(rows) + (t == "rebalance_plans") for t, rows in OLD_ROWS.items()}

        upgrade_with_cli(old_url)
        assert_old_data_intact(store)
        assert [(p.state, p.finished_at, p.holder) for p in store.plans()] == [
            *((state, finished, None) for state, finished in BACKFILLED), ("done", LATER, None),
        ]  # fmt: skip
        assert_models_match(store)
