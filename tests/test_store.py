"""HistoryStore on both backends: SQLite in tmp_path, and PostgreSQL on 127.0.0.1:5432 (a scratch database
made for the session and dropped after). Migrations against models, every method, the races that matter."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import StatementError

from hpcserve.errors import ValidationError
from hpcserve.store import (
    DatabaseUnavailable,
    DeploymentExists,
    EngineSample,
    HistoryStore,
    NewStep,
    NotFound,
    NotOwner,
    QueueSample,
    StoreError,
)
from hpcserve.store.migrate import alembic_config, head_revision
from hpcserve.store.retention import aggregate
from hpcserve.store.schema import Base
from tests.store_helpers import BACKENDS, empty_database, hpcserve, scratch_database

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
T = TypeVar("T")


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with scratch_database() as url:
        with HistoryStore(url) as store:
            store.upgrade()
        yield url


@pytest.fixture
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of the test's backend."""
    with empty_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Iterator[HistoryStore]:
    """A migrated, empty store (admin: root) whose clock the test sets."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/hpcserve.db"
    else:
        url = request.getfixturevalue("pg_url")
    with HistoryStore(url, admins={"root"}, clock=clock) as s:
        s.upgrade()
        if request.param == "postgres":
            with s.engine.begin() as conn:
                tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
                conn.exec_driver_sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
        yield s


def all_at_once(count: int, work: Callable[[int], T]) -> list[T]:
    """Run ``work(i)`` for i < count in threads released together; the results in order."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


# schema and engine


def upgrade(url: str) -> str | None:
    with HistoryStore(url) as store:
        return store.upgrade()


@pytest.mark.parametrize("fresh_url", BACKENDS, indirect=True)
def test_migrations_build_exactly_the_models(fresh_url: str) -> None:
    with HistoryStore(fresh_url) as store:
        assert store.schema_status().current is None
        revisions = all_at_once(2, lambda _: upgrade(fresh_url))  # at once: they run in turn
        assert revisions == [store.schema_status().head] * 2 and store.schema_status().up_to_date
        with store.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
        with store.engine.begin() as conn:
            command.downgrade(alembic_config(conn), "base")
        assert set(inspect(store.engine).get_table_names()) == {"alembic_version"}
        assert store.upgrade() == store.schema_status().head


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    folder = tmp_path / "not" / "yet"
    store = HistoryStore(f"sqlite:///{folder}/h.db")
    assert not folder.exists()  # the constructor does no I/O
    with store, store.engine.connect() as conn:
        pragma = {p: conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("journal_mode", "busy_timeout")}
        assert pragma == {"journal_mode": "wal", "busy_timeout": 5000}
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    assert folder.is_dir()


def test_bad_urls_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="invalid database URL"):
        HistoryStore("not a url")
    with pytest.raises(
        DatabaseUnavailable, match=r"database postgresql\+psycopg://nobody@127.0.0.1:1/x: .*fix:"
    ):
        HistoryStore("postgresql://nobody@127.0.0.1:1/x").upgrade()


def test_timestamps_come_back_utc(store: HistoryStore) -> None:
    tokyo = T0.astimezone(timezone(timedelta(hours=9)))
    store.add_queue_samples([QueueSample(tokyo, "train", 1, 2, 3, 4, 10)])
    (got,) = store.queue_samples()
    assert got.at == T0 and got.at.utcoffset() == timedelta(0)
    with pytest.raises(StatementError, match="naive datetime"):
        store.add_queue_samples([QueueSample(datetime(2026, 1, 1), "train", 1, 2, 3, 4, 10)])


# samples


def test_queue_samples_by_partition_and_window(store: HistoryStore) -> None:
    rows = [
        QueueSample(T0 + timedelta(minutes=m), p, m, 2 * m, 8, 0, 8) for m in range(4) for p in ("a", "b")
    ]
    assert store.add_queue_samples(rows) == 8
    assert store.add_queue_samples([]) == 0
    assert store.queue_samples() == rows
    assert store.queue_samples("b") == [r for r in rows if r.partition == "b"]
    window = store.queue_samples("a", since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3))
    assert [r.pending_jobs for r in window] == [1, 2]


def test_engine_samples_with_gateway_rows(store: HistoryStore) -> None:
    rows = [
        EngineSample(T0, "llama", None, gateway_waiting=5),
        EngineSample(
            T0, "llama", 0, waiting=3, running=4, kv_usage=0.5, ttft_p50=0.1, ttft_p95=0.4, tokens_per_s=900.0
        ),
        EngineSample(T0 + timedelta(seconds=15), "llama", 1, waiting=0, running=1),
        EngineSample(T0, "other", 0, waiting=9),
    ]
    store.add_engine_samples(rows)
    assert store.engine_samples("llama") == rows[:3]
    assert store.engine_samples("llama", since=T0 + timedelta(seconds=1)) == rows[2:3]


# deployments and replicas


def test_deployment_lifecycle_and_ownership(store: HistoryStore, clock: Clock) -> None:
    created = store.create_deployment("llama", "alice", {"model": "meta/llama", "gpus": 1}, 1)
    assert (created.owner, created.spec, created.generation, created.desired_replicas) == (
        "alice", {"model": "meta/llama", "gpus": 1}, 1, 1,
    )  # fmt: skip
    assert created.created_at == T0 and not created.deleted
    with pytest.raises(DeploymentExists, match="exists"):
        store.create_deployment("llama", "bob", {}, 1)
    clock.now = T0 + timedelta(minutes=5)
    assert store.set_desired("llama", 3, user="alice").desired_replicas == 3
    assert store.set_desired("llama", 2, user="root").desired_replicas == 2  # an admin
    with pytest.raises(NotOwner, match="belongs to alice, not bob") as refused:
        store.set_desired("llama", 9, user="bob")
    assert refused.value.exit_code == 77
    with pytest.raises(NotOwner):
        store.update_spec("llama", {"model": "x"}, user="bob")
    with pytest.raises(NotOwner):
        store.delete_deployment("llama", user="bob")
    updated = store.update_spec("llama", {"model": "meta/llama-2"}, user="alice")
    assert (updated.spec, updated.generation, updated.updated_at) == ({"model": "meta/llama-2"}, 2, clock.now)
    assert store.get_deployment("llama") == updated
    with pytest.raises(ValidationError, match="negative"):
        store.set_desired("llama", -1, user="alice")
    with pytest.raises(NotFound, match="no deployment 'nope'"):
        store.set_desired("nope", 1, user="root")
    store.create_deployment("alpha", "bob", {}, 0)
    assert [d.name for d in store.list_deployments()] == ["alpha", "llama"]
    assert store.delete_deployment("alpha", user="bob") is True  # no replicas: gone at once
    assert store.get_deployment("alpha") is None


def test_delete_waits_for_replicas(store: HistoryStore) -> None:
    store.create_deployment("llama", "alice", {}, 2)
    store.upsert_replica("llama", 0, job_id="101", state="ready")
    store.upsert_replica("llama", 1, job_id="102")
    assert store.delete_deployment("llama", user="alice") is False
    doomed = store.get_deployment("llama")
    assert doomed is not None and doomed.deleted and doomed.desired_replicas == 0
    assert store.delete_deployment("llama", user="alice") is False  # again: no error
    with pytest.raises(DeploymentExists, match="still stopping"):
        store.create_deployment("llama", "alice", {}, 1)
    with pytest.raises(NotFound):
        store.set_desired("llama", 1, user="alice")
    store.upsert_replica("llama", 0, state="dead")  # the reconciler still records its replicas
    assert store.remove_replica("llama", 0) is True
    assert store.get_deployment("llama") is not None
    assert store.remove_replica("llama", 1) is True
    assert store.get_deployment("llama") is None  # went with its last replica
    store.create_deployment("llama", "bob", {}, 1)


def test_replica_upsert_keeps_unset_fields(store: HistoryStore, clock: Clock) -> None:
    store.create_deployment("llama", "alice", {}, 2)
    first = store.upsert_replica("llama", 0, job_id="101", generation=1)
    assert (first.state, first.job_id, first.url, first.updated_at) == ("pending", "101", None, T0)
    clock.now = T0 + timedelta(minutes=1)
    ready = store.upsert_replica("llama", 0, state="ready", url="http://n1:8000", host="n1", port=8000,
                                 ready_at=clock.now)  # fmt: skip
    assert (ready.job_id, ready.generation, ready.state, ready.port) == ("101", 1, "ready", 8000)
    assert ready.ready_at == ready.updated_at == clock.now
    store.upsert_replica("llama", 1, job_id="102")
    assert [r.index for r in store.replicas("llama")] == [0, 1]
    assert store.replicas() == store.replicas("llama")
    with pytest.raises(ValidationError, match="unknown replica state 'up'"):
        store.upsert_replica("llama", 0, state="up")
    with pytest.raises(NotFound):
        store.upsert_replica("nope", 0, state="pending")
    assert store.remove_replica("llama", 1) is True
    assert store.remove_replica("llama", 1) is False
    assert [r.index for r in store.replicas("llama")] == [0]


# rebalance plans


def test_plan_steps_persist_as_they_run(store: HistoryStore, clock: Clock) -> None:
    moves = [{"node": "n3", "src": "train", "dst": "infer"}]
    kinds = ("drain", "wait", "move", "resume")
    plan_id = store.create_plan("inference queue", moves, [NewStep("n3", "train", "infer", k) for k in kinds])
    (plan,) = store.plans(state="pending")
    assert (plan.id, plan.moves, plan.reason) == (plan_id, moves, "inference queue")
    assert [(s.seq, s.kind, s.state) for s in store.steps(plan_id)] == [(i, k, "todo") for i, k in
                                                                          enumerate(kinds)]  # fmt: skip
    store.set_plan_state(plan_id, "running")
    clock.now = T0 + timedelta(seconds=10)
    assert store.start_step(plan_id, 0).started_at == clock.now
    clock.now = T0 + timedelta(seconds=20)
    done = store.mark_step(plan_id, 0, "done", "drained n3")
    assert (done.state, done.detail, done.finished_at) == ("done", "drained n3", clock.now)
    with HistoryStore(store.url.render_as_string(hide_password=False)) as other:  # a resumed executor
        assert [s.state for s in other.steps(plan_id)] == ["done", "todo", "todo", "todo"]
        assert other.plans(state="running")[0].updated_at == clock.now
    with pytest.raises(NotFound, match="no step 7"):
        store.mark_step(plan_id, 7, "done")
    with pytest.raises(ValidationError, match="unknown step state"):
        store.mark_step(plan_id, 1, "skipped")
    with pytest.raises(ValidationError, match="unknown step kind"):
        store.create_plan("x", [], [NewStep("n1", "a", "b", "teleport")])
    with pytest.raises(NotFound):
        store.set_plan_state(999, "done")
    assert store.plan(plan_id) == store.plans()[0] and store.plan(999) is None


def test_plans_record_their_holder_and_when_they_finished(store: HistoryStore, clock: Clock) -> None:
    plan_id = store.create_plan("x", [], [], holder="host1:10")
    assert [(p.holder, p.finished_at) for p in store.plans()] == [("host1:10", None)]
    store.set_plan_state(plan_id, "running", holder="host2:20")  # resumed by another process
    store.set_plan_state(plan_id, "running")  # no holder given: the recorded one stays
    running = store.plan(plan_id)
    assert running is not None and (running.holder, running.finished_at) == ("host2:20", None)
    clock.now = T0 + timedelta(minutes=3)
    store.set_plan_state(plan_id, "failed")
    clock.now = T0 + timedelta(minutes=9)
    store.set_plan_state(plan_id, "aborted")  # still final: it finished when it failed
    done = store.plan(plan_id)
    assert done is not None and (done.state, done.finished_at, done.updated_at) == (
        "aborted", T0 + timedelta(minutes=3), clock.now,
    )  # fmt: skip
    made_done = store.plan(store.create_plan("y", [], [], state="done"))
    assert made_done is not None and (made_done.finished_at, made_done.holder) == (clock.now, None)


# usage and leases


def test_usage_upsert_sums(store: HistoryStore) -> None:
    day = date(2026, 3, 2)
    all_at_once(8, lambda _: store.add_usage("key1", "llama", day, 1, 100, 10))
    store.add_usage("key1", "llama", day + timedelta(days=1), 2, 5, 5)
    store.add_usage("key2", "llama", day, 1, 1, 1)
    rows = store.usage("key1")
    assert [(u.day, u.requests, u.prompt_tokens, u.completion_tokens) for u in rows] == [
        (day, 8, 800, 80), (day + timedelta(days=1), 2, 5, 5),
    ]  # fmt: skip
    assert [u.key_id for u in store.usage(since=day)] == ["key1", "key2", "key1"]
    assert len(store.usage(since=day + timedelta(days=1))) == 1


def test_lock_race_and_expiry(store: HistoryStore) -> None:
    url = store.url.render_as_string(hide_password=False)
    for attempt in range(3):
        won = race_for_lock(url, f"leader-{attempt}", 6)
        assert won.count(True) == 1, won
    name, holder = "leader-2", f"host{won.index(True)}"
    assert store.try_lock(name, "intruder", 30, T0 + timedelta(seconds=29)) is False
    assert store.try_lock(name, holder, 30, T0 + timedelta(seconds=29)) is True  # renewed to 59 s
    assert store.try_lock(name, "intruder", 30, T0 + timedelta(seconds=40)) is False
    assert store.try_lock(name, "intruder", 30, T0 + timedelta(seconds=60)) is True  # expired: taken
    assert store.try_lock(name, holder, 30, T0 + timedelta(seconds=61)) is False
    assert store.release_lock(name, holder) is False
    assert store.release_lock(name, "intruder") is True
    assert store.try_lock(name, holder, 30, T0 + timedelta(seconds=62)) is True


def race_for_lock(url: str, name: str, count: int) -> list[bool]:
    """``count`` stores (separate engines, as separate processes have) try to take ``name`` at once."""
    stores = [HistoryStore(url) for _ in range(count)]
    try:
        for s in stores:
            s.queue_samples("warm-up")  # connected before the start: the race is for the lock alone
        return all_at_once(count, lambda i: stores[i].try_lock(name, f"host{i}", 30, T0))
    finally:
        for s in stores:
            s.close()


# retention


def queue_rows(start: datetime, count: int, step: timedelta) -> list[QueueSample]:
    return [QueueSample(start + i * step, "train", i, 2 * i, 8, i % 3, 8) for i in range(count)]


def test_retention_rolls_up_once(store: HistoryStore) -> None:
    now = datetime(2026, 3, 20, 12, 30, tzinfo=UTC)
    old = datetime(2026, 3, 10, 6, 0, tzinfo=UTC)  # ten days back: rolled up
    store.add_queue_samples(queue_rows(old, 8, timedelta(minutes=15)))  # two hours, four per hour
    store.add_queue_samples(queue_rows(now - timedelta(days=1), 3, timedelta(minutes=1)))  # recent: kept
    store.add_engine_samples([
        EngineSample(old, "llama", 0, waiting=2, kv_usage=0.5),
        EngineSample(old + timedelta(minutes=1), "llama", 1, waiting=6, kv_usage=None),
        EngineSample(old + timedelta(minutes=2), "llama", None, gateway_waiting=7),
    ])  # fmt: skip
    result = store.apply_retention(now)
    assert (result.queue_rolled, result.engine_rolled) == (8, 3)
    first, second = store.queue_rollups("train")
    assert (first.bucket_start, first.bucket_s, first.samples) == (old, 3600, 4)
    assert (first.avg["pending_jobs"], first.max["pending_jobs"], first.max["pending_gpus"]) == (1.5, 3, 6)
    assert (second.bucket_start, second.avg["pending_jobs"]) == (old + timedelta(hours=1), 5.5)
    (engine,) = store.engine_rollups("llama")
    assert (engine.samples, engine.avg["waiting"], engine.max["waiting"]) == (3, 4.0, 6)
    assert (engine.avg["kv_usage"], engine.avg["gateway_waiting"], engine.avg["running"]) == (0.5, 7, None)
    assert len(store.queue_samples()) == 3 and store.engine_samples("llama") == []

    again = store.apply_retention(now)  # idempotent: nothing is counted twice
    assert (again.queue_rolled, again.engine_rolled) == (0, 0)
    assert store.queue_rollups("train") == [first, second]

    store.add_queue_samples([QueueSample(old + timedelta(minutes=59), "train", 11, 0, 8, 0, 8)])  # late
    store.apply_retention(now)
    merged = store.queue_rollups("train")[0]
    assert (merged.samples, merged.avg["pending_jobs"], merged.max["pending_jobs"]) == (5, 3.4, 11)

    expired = store.apply_retention(now + timedelta(days=181))
    assert (expired.queue_rolled, expired.queue_rollups_deleted, expired.engine_rollups_deleted) == (3, 3, 1)
    assert store.queue_rollups() == [] and store.queue_samples() == []


def test_retention_keeps_the_partial_bucket(store: HistoryStore) -> None:
    now = datetime(2026, 3, 20, 12, 30, tzinfo=UTC)  # cutoff: 7 days back, down to the hour (12:00)
    store.add_queue_samples(queue_rows(now - timedelta(days=7, minutes=40), 4, timedelta(minutes=10)))
    assert store.apply_retention(now).queue_rolled == 1  # 11:50; 12:00-12:20 wait for their whole hour
    assert [r.at.minute for r in store.queue_samples()] == [0, 10, 20]


def test_aggregate_is_pure() -> None:
    rows = [("a", T0, 1, None), ("a", T0 + timedelta(minutes=59), 3, 4.0), ("b", T0, 5, 1.0)]
    a, b = aggregate(rows, 3600, ("x", "y"))
    assert (a.key, a.samples, a.avg, a.max) == ("a", 2, {"x": 2.0, "y": 4.0}, {"x": 3.0, "y": 4.0})
    assert (b.key, b.bucket_start, b.samples) == ("b", T0, 1)


# CLI


def test_cli_db_upgrade_and_status(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cli/hpcserve.db"
    status = hpcserve("db", "status", "--url", url, "--json")
    assert (
        status.returncode == 0 and '"current":null' in status.stdout and '"up_to_date":false' in status.stdout
    )
    head = head_revision()
    done = hpcserve("db", "upgrade", "--url", url)
    assert done.returncode == 0 and f"upgraded from empty to {head}" in done.stdout, done.stderr
    again = hpcserve("db", "upgrade", "--url", url, "--json")
    assert f'"from":"{head}","to":"{head}","changed":false' in again.stdout
    with HistoryStore(url) as store:
        assert store.schema_status().up_to_date


def test_cli_db_uses_the_site_config(tmp_path: Path) -> None:
    site = yaml.safe_load((Path(__file__).parent.parent / "site_configs" / "minicluster.yaml").read_text())
    site["database"]["url"] = f"sqlite:///{tmp_path}/site.db"
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(site))
    done = hpcserve("--site", str(tmp_path / "site.yaml"), "db", "upgrade", "--json")
    assert done.returncode == 0 and f'"url":"sqlite:///{tmp_path}/site.db"' in done.stdout, done.stderr


def test_cli_db_error_is_one_line() -> None:
    failed = hpcserve("db", "status", "--url", "postgresql://nobody@127.0.0.1:1/x")
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.count("\n") == 1 and failed.stderr.startswith("error: database postgresql+psycopg")


def test_db_group_through_the_main_cli(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from hpcserve.cli.main import cli

    url = f"sqlite:///{tmp_path}/runner.db"
    result = CliRunner().invoke(cli, ["db", "upgrade", "--url", url])
    assert result.exit_code == 0 and f"upgraded from empty to {head_revision()}" in result.output
    with HistoryStore(url) as store, store.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head_revision()
