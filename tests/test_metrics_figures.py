"""The service's /metrics figures without Slurm: the pure figures and watchers on literal reads and rows, and
``ServiceMetrics`` over a real SQLite history database and a real loopback HTTP server (/metrics and
/sd/engines)."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from hpcserve.model.cluster import Job, JobState, Node
from hpcserve.service.metrics import ServiceMetrics
from hpcserve.service.metrics_figures import (
    LeaseWatch,
    LostWorkWatch,
    PlanWatch,
    ReplicaWatch,
    cluster_figures,
    deployment_figures,
)
from hpcserve.store import HistoryStore
from hpcserve.store.leases import leases_held
from hpcserve.store.records import Deployment, LostWork, Plan, Replica

T0 = datetime(2026, 12, 7, 18, 0, tzinfo=UTC)
PRICES = {"a100": 3.2, None: 2.5}


def price(gpu_type: str | None) -> float:
    return PRICES.get(gpu_type, 2.5)


def node(name: str, parts: tuple[str, ...], total: int, alloc: int, gpu_type: str | None = None) -> Node:
    return Node(name, "mixed" if alloc else "idle", partitions=parts, gpus_total=total, gpus_alloc=alloc,
                gpu_type=gpu_type)  # fmt: skip


def job(jid: str, partition: str, state: JobState, gpus: int, nodes: tuple[str, ...] = ()) -> Job:
    return Job(id=jid, job_id=int(jid), name="j", user="alice", account="a", partition=partition,
               state=state, num_nodes=1, nodes=nodes, gpus=gpus)  # fmt: skip


NODES = [
    node("a1", ("train", "all"), 4, 3, "a100"),
    node("g1", ("infer", "all"), 2, 1),
    node("g2", ("infer", "all"), 2, 0),
]
JOBS = [
    job("1", "train", JobState.RUNNING, 3, ("a1",)),
    job("2", "infer", JobState.RUNNING, 1, ("g1",)),
    job("3", "train,infer", JobState.PENDING, 2),
    job("4", "train", JobState.PENDING, 0),
]


def test_cluster_figures_count_the_queue_and_price_each_node_once() -> None:
    figures = cluster_figures(T0, JOBS, NODES, price)
    by = {s.partition: s for s in figures.samples}
    assert (by["train"].pending_jobs, by["train"].pending_gpus) == (2, 2)
    assert (by["infer"].pending_jobs, by["infer"].pending_gpus) == (1, 2)  # "train,infer" counts in both
    assert (by["infer"].running_gpus, by["infer"].idle_gpus, by["infer"].total_gpus) == (1, 3, 4)
    assert figures.cost_per_hour == pytest.approx({"all": 3 * 3.2 + 2.5, "infer": 2.5, "train": 3 * 3.2})
    assert figures.cluster_cost_per_hour == pytest.approx(3 * 3.2 + 2.5)  # "all" and its members: once
    assert figures.job_cost == {"1": (3, pytest.approx(9.6)), "2": (1, 2.5)}  # running GPU jobs only


def deployment(name: str, desired: int, deleted: bool = False) -> Deployment:
    return Deployment(name, "alice", {}, 1, desired, T0, T0, T0 if deleted else None)


def replica(dep: str, index: int, job_id: str | None, state: str = "ready", generation: int = 1) -> Replica:
    return Replica(dep, index, generation, job_id, state, None, "g1", 8000 + index, T0, T0, T0)


def test_deployment_figures_charge_only_the_jobs_the_store_names_as_replicas() -> None:
    cluster = cluster_figures(T0, [*JOBS, job("9", "infer", JobState.RUNNING, 1, ("g1",))], NODES, price)
    figures = deployment_figures(
        [deployment("chat", 2), deployment("gone", 1, deleted=True)],
        [replica("chat", 0, "2"), replica("chat", 1, None, "pending"), replica("gone", 0, "1")],
        cluster,
    )  # job 9 might carry a copied replica comment: it is not a replica of chat in the store
    assert figures.desired == {"chat": 2}
    assert figures.replicas[("chat", "ready")] == 1 and figures.replicas[("chat", "pending")] == 1
    assert figures.replicas[("chat", "dead")] == 0 and ("gone", "ready") not in figures.replicas
    assert (figures.gpus, figures.cost_per_hour) == ({"chat": 1}, {"chat": 2.5})


def test_replica_watch_counts_starts_and_failures_after_the_first_look() -> None:
    watch = ReplicaWatch()
    watch.look([replica("chat", 0, "10"), replica("chat", 1, "11", "dead")])  # what was there: not counted
    assert (sum(watch.started.values()), sum(watch.failures.values())) == (0, 0)
    watch.look([replica("chat", 0, "10"), replica("chat", 1, "12", "pending")])  # 11 replaced: already dead
    assert (watch.started["chat"], watch.failures["chat"]) == (1, 0)
    watch.look([replica("chat", 0, "13", "pending"), replica("chat", 1, "12", "dead")])  # 10 gone, 12 died
    assert (watch.started["chat"], watch.failures["chat"]) == (2, 2)
    watch.look([replica("chat", 0, "13"), replica("chat", 1, "12", "dead")])  # 12 still dead: once
    assert watch.failures["chat"] == 2
    watch.look([replica("chat", 0, "14", "pending", generation=2), replica("chat", 1, "12", "dead")])
    assert (watch.started["chat"], watch.failures["chat"]) == (3, 2)  # a new spec: a start, no failure


def plan(pid: int, state: str, *dsts: str) -> Plan:
    moves = [{"node": f"n{i}", "src": "x", "dst": d} for i, d in enumerate(dsts)]
    return Plan(pid, T0, T0, state, "r", moves, T0 if state in ("done", "failed", "aborted") else None, None)


def test_plan_watch_counts_the_moves_of_plans_done_after_the_first_look() -> None:
    watch = PlanWatch()
    watch.look([plan(1, "done", "inference"), plan(2, "running", "training")])
    assert not watch.moves
    watch.look([plan(1, "done", "inference"), plan(2, "done", "training"), plan(3, "failed", "inference")])
    assert watch.moves == {"to_training": 1}
    watch.look([plan(2, "done", "training"), plan(4, "done", "inference", "inference")])
    assert watch.moves == {"to_training": 1, "to_inference": 2}


def lost(at: datetime, gpu_s: float) -> LostWork:
    return LostWork(at, "7", "bob", "g1", 2, gpu_s, "chat", "8")


def test_lost_work_and_lease_watches() -> None:
    watch = LostWorkWatch()
    watch.look([lost(T0 - timedelta(hours=1), 7200)], T0)  # before the first look: not counted
    assert (watch.evictions, watch.lost_gpu_h) == (0, 0.0)
    watch.look([lost(T0, 3600), lost(T0 + timedelta(seconds=5), 1800)], T0 + timedelta(seconds=10))
    watch.look([lost(T0 + timedelta(seconds=5), 1800)], T0 + timedelta(seconds=20))  # seen already
    assert (watch.evictions, watch.lost_gpu_h) == (1, 0.5)
    leases = LeaseWatch()
    leases.look({"sampler": True, "retention": False})
    leases.look({"sampler": False, "retention": True})
    leases.look({"sampler": True, "retention": True})
    assert leases.lost == {"sampler": 1, "retention": 0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_service_metrics_over_a_real_store_and_server(tmp_path: Path) -> None:
    store = HistoryStore(f"sqlite:///{tmp_path}/h.db")
    store.upgrade()
    store.create_deployment("chat", "alice", {"engine": "simulator"}, 1)
    store.upsert_replica("chat", 0, job_id="2", state="ready", host="g1", port=8011, generation=1)
    now = datetime.now(UTC)
    assert store.try_lock("sampler", "me:1", 60, now) and store.try_lock("retention", "other:2", 60, now)
    metrics = ServiceMetrics(price)
    metrics.reading(lambda: (now, JOBS, NODES))()
    metrics.look(store, "me:1", ["sampler", "retention"])
    store.add_lost_work([lost(datetime.now(UTC) + timedelta(seconds=1), 5400)])
    pid = store.create_plan("r", [{"node": "g2", "src": "inference", "dst": "training"}], [], "running")
    store.set_plan_state(pid, "done")
    store.release_lock("sampler", "me:1")
    metrics.look(store, "me:1", ["sampler", "retention"])
    value = metrics.registry.get_sample_value
    assert value("hpcserve_queue_pending_gpus", {"partition": "infer"}) == 2
    assert value("hpcserve_partition_gpus", {"partition": "train", "state": "total"}) == 4
    assert value("hpcserve_gpu_cost_dollars_per_hour", {"partition": "train"}) == pytest.approx(9.6)
    assert value("hpcserve_deployment_gpu_cost_dollars_per_hour", {"deployment": "chat"}) == 2.5
    assert value("hpcserve_deployment_replicas", {"deployment": "chat", "state": "ready"}) == 1
    assert value("hpcserve_lending_events_total", {"kind": "to_training"}) == 1
    assert value("hpcserve_lending_events_total", {"kind": "eviction"}) == 1
    assert value("hpcserve_lost_gpu_hours_total") == 1.5
    assert value("hpcserve_lease_held", {"lease": "sampler"}) == 0  # released after the first look
    assert value("hpcserve_lease_lost_total", {"lease": "sampler"}) == 1
    assert value("hpcserve_lease_held", {"lease": "retention"}) == 0  # another process's
    port = free_port()
    metrics.serve(port, "127.0.0.1")
    page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'hpcserve_queue_pending_jobs{partition="train"} 2.0' in page
    targets = httpx.get(f"http://127.0.0.1:{port}/sd/engines", timeout=5).json()
    assert targets == [{"targets": ["g1:8011"], "labels": {"deployment": "chat", "replica": "0"}}]
    store.close()


def test_held_leases_are_named_and_unexpired(tmp_path: Path) -> None:
    store = HistoryStore(f"sqlite:///{tmp_path}/h.db")
    store.upgrade()
    now = datetime.now(UTC)
    store.try_lock("a", "me:1", 30, now)
    store.try_lock("b", "you:2", 30, now)
    assert leases_held(store, "me:1", now) == {"a": True, "b": False}
    assert leases_held(store, "me:1", now + timedelta(seconds=31)) == {"a": False, "b": False}
    store.close()


def test_figures_go_while_slurmctld_does_not_answer() -> None:
    class Down:
        last_sample, down_since = T0, T0

    metrics = ServiceMetrics(price)
    metrics.reading(lambda: (T0, JOBS, NODES))()
    assert metrics.registry.get_sample_value("hpcserve_queue_pending_jobs", {"partition": "train"}) == 2
    metrics.sampled(Down())  # type: ignore[arg-type]
    assert metrics.registry.get_sample_value("hpcserve_sampler_slurmctld_unreachable") == 1
    assert metrics.registry.get_sample_value("hpcserve_queue_pending_jobs", {"partition": "train"}) is None
