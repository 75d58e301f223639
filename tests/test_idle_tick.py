"""The service's idle tick and its /metrics collector over a real SQLite store: flags stored for the API,
one log line per newly flagged job, a replica's last request from its engine samples, the scale-down
action, and the exported families. (The cluster test, test_telemetry_cluster.py, runs them in a service.)"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from hpcserve.api.telemetry import FLAGS_STATE, current_flags, current_warm
from hpcserve.config.policy import IdleActions, IdleRules
from hpcserve.model.cluster import Job, JobState
from hpcserve.model.telemetry import GpuSample, IdleFlag
from hpcserve.service.idle_tick import IdleTick, scale_down, tick_interval_s
from hpcserve.service.metrics_telemetry import TelemetryCollector
from hpcserve.serving.pools import AwakeState, pool_spec
from hpcserve.serving.residency import AWAKE_FLOOR_PREFIX
from hpcserve.store import EngineSample, HistoryStore

T0 = datetime(2026, 12, 7, 19, 0, tzinfo=UTC)
RULES = IdleRules(gpu_util_below_pct=20, window_s=60, replica_no_requests_s=60, sample_gap_s=15)


def spec(name: str, min_replicas: int = 0) -> dict[str, object]:
    return {"name": name, "served_model_name": name, "model": "m", "engine": "simulator",
            "gpus_per_replica": 1, "min_replicas": min_replicas, "max_replicas": 3}  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    with HistoryStore(f"sqlite:///{tmp_path}/h.db") as s:
        s.upgrade()
        yield s


def job(job_id: str, user: str, tag: str | None = None, gpus: int = 1) -> Job:
    return Job(job_id, int(job_id), "j", user, "acct", "infer", JobState.RUNNING, 1, ("node5",), gpus,
               start=T0 - timedelta(hours=1), tag=tag)  # fmt: skip


def report(store: HistoryStore, job_id: str, user: str, util: float, kind: str = "training") -> None:
    rows = [GpuSample(T0 - timedelta(seconds=s), job_id, "GPU-x", 0, util, 10, 20, 100.0, 1000)
            for s in range(0, 61, 10)]  # fmt: skip
    store.add_gpu_samples(rows, user=user, kind=kind)


def test_the_tick_stores_flags_logs_new_ones_once_and_keeps_their_since(
    store: HistoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    report(store, "5", "alice", 5.0)
    report(store, "9", "bob", 90.0)
    clock = Clock()
    tick = IdleTick(lambda: [job("5", "alice"), job("9", "bob")], store, RULES, clock)
    with caplog.at_level(logging.INFO, "hpcserve.idle"):
        (flag,) = tick.tick()
    assert flag.job_id == "5" and flag.since == T0 - timedelta(seconds=60)
    assert current_flags(store.get_state(FLAGS_STATE), T0) == [flag]
    assert [r.message for r in caplog.records] == [
        "idle: job 5 of alice (training, 1 GPUs): GPUs averaged 5% for 60 s (< 20%); 0.02 GPU-hours wasted "
        "so far"
    ]
    caplog.clear()
    clock.now = T0 + timedelta(seconds=10)
    report(store, "5", "alice", 5.0)  # readings go on (the same instants again: still covered)
    store.add_gpu_samples([GpuSample(clock.now, "5", "GPU-x", 0, 5.0, 10, 20, None, None)], user="alice",
                          kind="training")  # fmt: skip
    (again,) = tick.tick()
    assert again.since == flag.since and caplog.records == []  # still flagged: no second line
    assert tick.running == frozenset({"5", "9"})


def test_a_replica_is_judged_by_its_last_request_and_scaled_down_when_asked(
    store: HistoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.create_deployment("llama", "alice", spec("llama"), 2, served_model_name="llama")
    for index, job_id in ((0, "20"), (1, "21")):
        store.upsert_replica("llama", index, job_id=job_id, state="ready")
    store.add_engine_samples([EngineSample(T0 - timedelta(seconds=30), "llama", 1, waiting=0, running=1)])
    running = [job("20", "alice", "hpcserve:replica:llama:0"), job("21", "alice", "hpcserve:replica:llama:1")]
    rules = RULES.model_copy(update={"action": IdleActions(inference="scale_down")})
    with caplog.at_level(logging.INFO, "hpcserve.idle"):
        (flag,) = IdleTick(lambda: running, store, rules, Clock()).tick()
    assert flag.job_id == "20" and flag.kind == "inference" and "since it started" in flag.reason
    deployment = store.get_deployment("llama")
    assert deployment is not None and deployment.spec["max_replicas"] == 1  # 2 running -> at most 1
    assert "idle: deployment llama scaled down: max_replicas 3 -> 1" in caplog.text


def test_scale_down_never_goes_below_min_replicas(store: HistoryStore) -> None:
    store.create_deployment("one", "alice", spec("one", min_replicas=1), 1, served_model_name="one")
    store.upsert_replica("one", 0, job_id="30", state="ready")
    rules = RULES.model_copy(update={"action": IdleActions(inference="scale_down")})
    IdleTick(lambda: [job("30", "alice", "hpcserve:replica:one:0")], store, rules, Clock()).tick()
    deployment = store.get_deployment("one")
    assert deployment is not None and deployment.spec["max_replicas"] == 3


def test_the_collector_exports_the_newest_readings_and_the_flags(store: HistoryStore) -> None:
    report(store, "5", "alice", 5.0)
    report(store, "9", "bob", 90.0)
    report(store, "7", "carol", 50.0)  # not running any more
    tick = IdleTick(lambda: [job("5", "alice"), job("9", "bob", gpus=4)], store, RULES, Clock())
    tick.tick()
    registry = CollectorRegistry()
    registry.register(TelemetryCollector(store, RULES, lambda: tick.running, Clock()))
    text = generate_latest(registry).decode()
    assert 'hpcserve_job_gpu_utilization_ratio{gpu="0",job_id="5",user="alice"} 0.05' in text
    assert 'hpcserve_job_gpu_utilization_ratio{gpu="0",job_id="9",user="bob"} 0.9' in text
    assert 'hpcserve_job_gpu_memory_used_bytes{gpu="0",job_id="9",user="bob"} 10.0' in text
    assert 'hpcserve_job_gpu_power_watts{gpu="0",job_id="5",user="alice"} 100.0' in text
    assert 'job_id="7"' not in text
    assert 'hpcserve_job_idle{job_id="5",kind="training",user="alice"} 1.0' in text
    assert 'hpcserve_idle_gpu_hours{kind="training"} 0.0167' in text
    assert 'hpcserve_idle_gpu_hours{kind="inference"} 0.0' in text


def test_the_collector_survives_a_database_that_is_away(tmp_path: Path) -> None:
    broken = HistoryStore(f"sqlite:///{tmp_path}/none/h.db")  # never migrated: no tables
    registry = CollectorRegistry()
    registry.register(TelemetryCollector(broken, RULES))
    assert "hpcserve_job_idle" not in generate_latest(registry).decode()


def test_the_tick_runs_at_a_sixth_of_the_shortest_span() -> None:
    assert tick_interval_s(RULES) == 10
    assert tick_interval_s(IdleRules()) == 60 and tick_interval_s(IdleRules(window_s=6)) == 2


def test_a_warm_deployments_replica_is_asleep_by_design_never_flagged_and_listed_as_warm(
    store: HistoryStore,
) -> None:
    store.create_deployment("sleepy", "alice", {**spec("sleepy"), "warm_after_s": 30}, 1,
                            served_model_name="sleepy")  # fmt: skip
    store.upsert_replica("sleepy", 0, job_id="40", state="ready")
    report(store, "40", "alice", 0.0, kind="inference")  # its engine sleeps: the GPU does nothing
    running = [job("40", "alice", "hpcserve:replica:sleepy:0")]
    rules = RULES.model_copy(update={"action": IdleActions(inference="scale_down")})
    tick = IdleTick(lambda: running, store, rules, Clock())
    store.set_tier("sleepy", "warm", T0)
    assert tick.tick() == []
    assert current_warm(store.get_state(FLAGS_STATE), T0) == [
        {"job_id": "40", "user": "alice", "deployment": "sleepy", "gpus": 1}
    ]
    deployment = store.get_deployment("sleepy")
    assert deployment is not None and deployment.spec["max_replicas"] == 3  # not scaled down
    store.set_tier("sleepy", "hot", T0)  # hot again and still idle: judged as any replica
    (flag,) = tick.tick()
    assert flag.job_id == "40" and current_warm(store.get_state(FLAGS_STATE), T0) == []


def test_scale_down_leaves_a_warm_deployment_as_it_is(
    store: HistoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.create_deployment("sleepy", "alice", {**spec("sleepy"), "warm_after_s": 30}, 2,
                            served_model_name="sleepy")  # fmt: skip
    for index in (0, 1):
        store.upsert_replica("sleepy", index, job_id=str(50 + index), state="ready")
    store.set_tier("sleepy", "warm", T0)
    flag = IdleFlag("50", "alice", "inference", "quiet", T0, 1, 1.0, 0.0)
    with caplog.at_level(logging.INFO, "hpcserve.idle"):
        assert scale_down(store, "sleepy", flag) is None
    assert "idle: deployment sleepy not scaled down: warm: asleep by design (job 50)" in caplog.text


def make_pool(store: HistoryStore, replicas: int, members: tuple[str, ...] = ("a", "b"),
              max_awake: int = 2) -> list[Job]:  # fmt: skip
    """Pool ``p`` of alice's ``members`` (each at most 3 replicas), ``replicas`` of its jobs running."""
    for member in members:
        shape = {**spec(member), "pool": "p", "pool_max_awake": max_awake, "idle_to_zero_s": 600}
        store.join_pool(member, "alice", shape, "p", pool_spec, served_model_name=member)
    for index in range(replicas):
        store.upsert_replica("p", index, job_id=str(60 + index), state="ready")
    return [job(str(60 + i), "alice", f"hpcserve:replica:p:{i}") for i in range(replicas)]


def members_max(store: HistoryStore) -> dict[str, int]:
    return {d.name: d.spec["max_replicas"] for d in store.list_deployments()}


SCALE_DOWN = RULES.model_copy(update={"action": IdleActions(inference="scale_down")})


def test_an_idle_pool_gives_up_a_replica_through_its_members_bounds_and_a_leave_keeps_it(
    store: HistoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    running = make_pool(store, 2)
    report(store, "60", "alice", 0.0, kind="inference")  # every engine asleep: the GPU does nothing
    with caplog.at_level(logging.INFO, "hpcserve.idle"):
        flags = IdleTick(lambda: running, store, SCALE_DOWN, Clock()).tick()
    assert [f.job_id for f in flags] == ["60", "61"] and "since it started" in flags[0].reason
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    # as `hpcserve scale a --max 1` and `scale b --max 1`: the pool's bound is its members' most
    assert members_max(store) == {"a": 1, "b": 1, "p": 1}
    assert "idle: pool p scaled down: max_replicas 3 -> 1 on its members a, b (job 60: GPUs averaged 0%" \
        in caplog.text  # fmt: skip
    # the second flag finds one replica's worth left to give: it holds at 1
    assert "idle: pool p not scaled down: max_replicas 1, min_replicas 0, awake floor 0, 2 running (job " \
        "61)" in caplog.text  # fmt: skip
    store.leave_pool("b", "p", pool_spec, user="alice")  # a member leaving derives the pool again
    pool = store.get_deployment("p")
    assert pool is not None and pool.spec["max_replicas"] == 1
    joined = {**spec("c"), "max_replicas": 1, "pool": "p", "pool_max_awake": 2, "idle_to_zero_s": 600}
    store.join_pool("c", "alice", joined, "p", pool_spec, served_model_name="c")  # so does a join
    assert members_max(store) == {"a": 1, "c": 1, "p": 1}


def test_an_idle_pool_never_goes_below_its_members_min_replicas(store: HistoryStore) -> None:
    running = make_pool(store, 2)
    a = store.get_deployment("a")
    assert a is not None
    store.update_spec("a", {**a.spec, "min_replicas": 2}, user="alice")
    store.refresh_pool("p", pool_spec)
    IdleTick(lambda: running, store, SCALE_DOWN, Clock()).tick()
    assert members_max(store) == {"a": 3, "b": 3, "p": 3}


def test_a_pool_replica_is_not_idle_while_a_member_was_requested_within_the_window(
    store: HistoryStore,
) -> None:
    running = make_pool(store, 2)
    for job_id in ("60", "61"):
        report(store, job_id, "alice", 0.0, kind="inference")  # asleep between requests: reads 0%
    # member a asked 30 s ago (the controller's record: a gateway sample or an agent's last_used)
    asked = AwakeState({"a": T0 - timedelta(seconds=30)}, (T0 - timedelta(seconds=30),))
    store.put_state(AWAKE_FLOOR_PREFIX + "p", msgspec.to_builtins(asked))
    tick = IdleTick(lambda: running, store, SCALE_DOWN, Clock())
    assert tick.tick() == []
    store.put_state(AWAKE_FLOOR_PREFIX + "p", {})
    # nothing in the floor's record, but replica 1's engines served 30 s ago: the pool is in use
    store.add_engine_samples([EngineSample(T0 - timedelta(seconds=30), "p", 1, waiting=0, running=1)])
    assert tick.tick() == []
    assert members_max(store) == {"a": 3, "b": 3, "p": 3}


def test_the_replicas_holding_the_awake_floor_are_not_idle_and_bound_the_scale_down(
    store: HistoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    running = make_pool(store, 3, max_awake=1)
    # a and b asked 100 s ago: out of the policy's 60 s, inside the pool's 600 s use window, so its
    # awake floor is 2 jobs (one awake engine each)
    asked = T0 - timedelta(seconds=100)
    state = AwakeState({"a": asked, "b": asked}, (asked, asked))
    store.put_state(AWAKE_FLOOR_PREFIX + "p", msgspec.to_builtins(state))
    store.add_engine_samples([EngineSample(asked, "p", i, waiting=0, running=1) for i in (0, 2)])
    with caplog.at_level(logging.INFO, "hpcserve.idle"):
        (flag,) = IdleTick(lambda: running, store, SCALE_DOWN, Clock()).tick()
    assert flag.job_id == "61"  # replicas 0 and 2 served last: they hold the floor
    assert members_max(store) == {"a": 2, "b": 2, "p": 2}
    assert "idle: pool p scaled down: max_replicas 3 -> 2 on its members a, b (job 61" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, "hpcserve.idle"):
        assert scale_down(store, "p", flag, T0) is None  # a further step would go under the floor
    assert "idle: pool p not scaled down: max_replicas 2, min_replicas 0, awake floor 2, 3 running" \
        in caplog.text  # fmt: skip
    assert members_max(store) == {"a": 2, "b": 2, "p": 2}
