"""The serving controller, with the store real and Slurm, the launcher and the engines faked: its scrape
(every ready or draining replica's engine at once; silent ones left out), trust (only the jobs it submitted,
run by the owner, are replicas), the owner's GPU limit on every scale-up (capped, and shown), and the
autoscaler's state kept in the database."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from hpcserve.config import Policy, load_policy
from hpcserve.serving.autoscaler import ScalerState
from hpcserve.serving.controller import Scrape, ServingController
from hpcserve.serving.engine_stats import EngineStats
from hpcserve.serving.launcher import Launched
from hpcserve.serving.scaling import ScalerRecord, state_name
from hpcserve.serving.tags import replica_tag, secret_hash
from hpcserve.slurm.models import Job, JobState, Node
from hpcserve.store import HistoryStore
from tests.conftest import POLICY

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
SIM = {"name": "llm", "model": "m", "engine": "simulator", "gpus_per_replica": 1, "max_replicas": 4}


def stats(waiting: int) -> EngineStats:
    return EngineStats(running=1, waiting=waiting, kv_usage=0.5, ttft_p50=0.1, ttft_p95=0.2, e2e_p50=1.0,
                       e2e_p95=2.0, prompt_tokens_total=0, generation_tokens_total=0, ttft_buckets=(),
                       e2e_buckets=())  # fmt: skip


def job(job_id: int, deployment: str, index: int, user: str = "alice", gpus: int = 1) -> Job:
    return Job(str(job_id), job_id, f"{deployment}-r{index}", user, "acct", "infer", JobState.RUNNING, 1,
               gpus=gpus, start=NOW - timedelta(seconds=5), tag=replica_tag(deployment, index))  # fmt: skip


@dataclass
class FakeSlurm:
    queue: list[Job] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    drained: set[str] = field(default_factory=set)

    def jobs(self) -> list[Job]:
        return list(self.queue)

    def nodes(self) -> list[Node]:
        return [Node(n, "mixed", frozenset({"DRAIN"})) for n in sorted(self.drained)]

    def cancel(self, job_ids: list[str]) -> None:
        self.cancelled += job_ids


@dataclass
class FakeLauncher:
    """Submits nothing: each launch becomes a running job of the owner in the fake queue."""

    slurm: FakeSlurm
    launched: list[tuple[str, int]] = field(default_factory=list)
    next_id: int = 500

    def launch(self, submitter: Any, deployment: Any, spec: Any, index: int) -> Launched:
        self.next_id += 1
        self.launched.append((deployment.name, index))
        self.slurm.queue.append(job(self.next_id, deployment.name, index, deployment.owner,
                                    spec.gpus_per_replica))  # fmt: skip
        return Launched(str(self.next_id), secret_hash(f"secret-{self.next_id}"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    with HistoryStore(f"sqlite:///{tmp_path}/h.db", admins=["root"]) as s:  # the service is an admin
        s.upgrade()
        yield s


def policy(max_gpus_per_user: int = 16) -> Policy:
    base = load_policy(POLICY)
    inference = base.classes["inference"].model_copy(update={"max_gpus_per_user": max_gpus_per_user})  # type: ignore[index]
    return base.model_copy(update={"classes": {**base.classes, "inference": inference}})


def controller(store: HistoryStore, scrape: Scrape | None = None, slurm: FakeSlurm | None = None,
               gpu_limit: int = 16) -> ServingController:  # fmt: skip
    slurm = slurm or FakeSlurm()
    unused: Any = None  # the fake launcher needs no submitter
    return ServingController(store=store, client=slurm, submitter=lambda: unused,  # type: ignore[arg-type]
                             launcher=FakeLauncher(slurm), policy=policy(gpu_limit),  # type: ignore[arg-type]
                             ready_timeout_s=60, scrape=scrape or (lambda url: None),
                             service_user="root", clock=lambda: NOW)  # fmt: skip


def serve(store: HistoryStore, name: str, owner: str = "alice", **spec: Any) -> None:
    store.create_deployment(name, owner, {**SIM, "name": name, **spec}, 0, served_model_name=name)


def test_engines_are_scraped_at_once_and_silent_ones_left_out(store: HistoryStore) -> None:
    store.create_deployment("llm", "alice", {}, 5)
    for i, state in enumerate(["ready", "ready", "draining", "ready", "pending"]):
        store.upsert_replica("llm", i, job_id=str(100 + i), state=state, url=f"http://n{i}:80{i}")
    together = threading.Barrier(4, timeout=10)  # breaks (and the test fails) unless all four wait at once

    def scrape(url: str) -> EngineStats | None:
        together.wait()
        index = int(url.rsplit("80", 1)[1])
        return None if index == 3 else stats(waiting=index)

    got = controller(store, scrape)._scrape("llm", store.replicas("llm"), NOW)

    assert {i: s.waiting for i, s in got.items()} == {0: 0, 1: 1, 2: 2}  # 3 silent, 4 not ready
    assert sorted((s.replica, s.waiting) for s in store.engine_samples("llm")) == [(0, 0), (1, 1), (2, 2)]


def test_one_engine_is_scraped_in_the_tick_thread(store: HistoryStore) -> None:
    store.create_deployment("llm", "alice", {}, 1)
    store.upsert_replica("llm", 0, job_id="100", state="ready", url="http://n0:800")
    threads: list[str] = []

    def scrape(url: str) -> EngineStats | None:
        threads.append(threading.current_thread().name)
        return stats(waiting=7)

    got = controller(store, scrape)._scrape("llm", store.replicas("llm"), NOW)
    assert {i: s.waiting for i, s in got.items()} == {0: 7} and threads == [threading.current_thread().name]


def test_foreign_tagged_jobs_are_ignored_and_the_replica_is_the_services(store: HistoryStore) -> None:
    serve(store, "llm", min_replicas=1)
    slurm = FakeSlurm([job(900, "llm", 0, user="bob"), job(901, "llm", 5, user="bob")])
    ctl = controller(store, slurm=slurm)
    ctl.tick()
    ctl.tick()
    (replica,) = store.replicas("llm")
    assert (replica.index, replica.job_id, replica.state) == (0, "501", "starting")
    assert replica.secret_hash == secret_hash("secret-501")
    assert slurm.cancelled == [] and ctl.ignored == {"900", "901"}  # never cancelled: not the service's


def test_announced_replica_becomes_ready_only_for_its_own_job(store: HistoryStore) -> None:
    serve(store, "llm", min_replicas=1)
    slurm = FakeSlurm()
    ctl = controller(store, slurm=slurm)
    ctl.tick()
    store.upsert_replica("llm", 0, url="http://node5:8000", ready_at=NOW)  # what the API records
    ctl.tick()
    (replica,) = store.replicas("llm")
    assert replica.state == "ready" and replica.url == "http://node5:8000"


def test_a_replica_on_part_of_a_gpu_counts_as_that_part_of_the_owners_gpus(store: HistoryStore) -> None:
    serve(store, "quarter", min_replicas=4, max_replicas=6, gpu_fraction=0.25)
    slurm = FakeSlurm(
        [msgspec.structs.replace(job(42, "x", 0, gpus=0), shards=2)]
    )  # an alice job on 2 shards
    ctl = controller(store, slurm=slurm, gpu_limit=1)
    ctl.tick()  # 0.5 GPU held: two quarter replicas fit, not zero (as whole GPUs) nor four
    assert sorted(ctl.launcher.launched) == [("quarter", 0), ("quarter", 1)]  # type: ignore[attr-defined]
    record = ScalerRecord.from_json(store.get_state(state_name("quarter")))
    assert record.capped == ("max_gpus_per_user: alice holds or waits for 0.5 of 1 GPUs; 4 replicas wanted, "
                             "2 fit")  # fmt: skip


def test_scale_up_is_capped_by_the_owners_gpus_across_deployments(store: HistoryStore) -> None:
    serve(store, "big", min_replicas=3, gpus_per_replica=2)
    serve(store, "other", min_replicas=2, gpus_per_replica=2)
    serve(store, "bobs", owner="bob", min_replicas=3, gpus_per_replica=2)
    slurm = FakeSlurm([job(42, "x", 0, user="alice", gpus=2)])  # an alice job outside these deployments
    ctl = controller(store, slurm=slurm, gpu_limit=6)
    ctl.tick()
    launched = ctl.launcher.launched  # type: ignore[attr-defined]
    assert sorted(launched) == [("big", 0), ("big", 1), ("bobs", 0), ("bobs", 1), ("bobs", 2)]
    deployments = {d.name: d for d in store.list_deployments()}
    assert deployments["big"].desired_replicas == 2 and deployments["other"].desired_replicas == 0
    records = {n: ScalerRecord.from_json(store.get_state(state_name(n))) for n in deployments}
    assert records["big"].capped and "max_gpus_per_user" in records["big"].capped
    assert records["other"].capped and "alice holds or waits for 6 of 6" in records["other"].capped
    assert records["bobs"].capped is None  # bob's limit is his own
    shown = {r["name"]: r for r in _rows_as_alice(store, slurm)}  # what `hpcserve deployments` shows
    assert shown["big"]["capped"] == records["big"].capped and shown["bobs"]["capped"] is None


def _rows_as_alice(store: HistoryStore, slurm: FakeSlurm) -> list[dict[str, Any]]:
    from hpcserve.api import deployments as api_deployments
    from hpcserve.api.caller import Caller
    from hpcserve.api.context import ApiContext
    from hpcserve.config import load_site_config
    from tests.conftest import SITE

    api = ApiContext(load_site_config(SITE), policy(6), store, slurm)  # type: ignore[arg-type]
    return api_deployments.list_rows(api, Caller(1001, "alice", frozenset()))


def test_scaler_state_lives_in_the_database(store: HistoryStore) -> None:
    serve(store, "llm", min_replicas=0, max_replicas=2)
    seen: list[ScalerState | None] = []

    def autoscale(deployment: Any, replicas: Any, stats: Any, waiting: int, state: ScalerState | None,
                  now: datetime) -> tuple[int, ScalerState]:  # fmt: skip
        seen.append(state)
        return 0, ScalerState(last_traffic=now, needed_at=(now,), seen_capacity=3)

    first = controller(store)
    first.autoscaler = autoscale
    first.tick()
    again = controller(store)  # a restarted service: nothing in memory
    again.autoscaler = autoscale
    again.tick()
    assert seen == [ScalerState(), ScalerState(last_traffic=NOW, needed_at=(NOW,), seen_capacity=3)]
    stored = store.get_state(state_name("llm"))
    assert stored is not None and stored["state"]["seen_capacity"] == 3 and stored["capped"] is None


def test_a_launch_that_cannot_be_recorded_is_cancelled(
    store: HistoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve(store, "llm", min_replicas=1)
    slurm = FakeSlurm()
    ctl = controller(store, slurm=slurm)

    def down(*args: Any, **kwargs: Any) -> None:
        raise OSError("database unavailable")

    monkeypatch.setattr(store, "upsert_replica", down)
    ctl.tick()
    assert slurm.cancelled == ["501"]  # never trusted, so never left holding alice's GPUs


@dataclass
class CachedSlurm(FakeSlurm):
    """A fake behind a per-tick view: counts how often the controller says its cached reads are stale."""

    invalidated: int = 0
    settled: list[bool] = field(default_factory=list)

    def invalidate(self) -> None:
        self.invalidated += 1

    def settle(self, calm: bool) -> None:
        self.settled.append(calm)


def test_a_launch_makes_a_shared_slurm_view_read_again(store: HistoryStore) -> None:
    serve(store, "llm", min_replicas=2)
    slurm = CachedSlurm()
    ctl = controller(store, slurm=slurm)
    ctl.tick()
    assert sorted(r.index for r in store.replicas("llm")) == [0, 1]
    assert slurm.invalidated == 2  # one per launch: the next tick sees the jobs just submitted
    ctl.tick()
    assert slurm.invalidated == 2 and len(slurm.queue) == 2  # nothing launched, nothing dropped


def test_the_controller_is_calm_only_while_every_replica_is_ready_and_answering(store: HistoryStore) -> None:
    serve(store, "llm", min_replicas=1)
    slurm = CachedSlurm()
    answering = {"yes": True}
    ctl = controller(store, slurm=slurm, scrape=lambda url: stats(0) if answering["yes"] else None)
    ctl.tick()  # launches: moving
    assert slurm.settled[-1] is False
    store.upsert_replica("llm", 0, url="http://node5:8000", ready_at=NOW)
    ctl.tick()  # starting -> ready: an action, still moving
    assert slurm.settled[-1] is False
    ctl.tick()
    assert slurm.settled[-1] is True  # ready, answering, nothing done: Slurm may be read less often
    answering["yes"] = False
    ctl.tick()  # the engine is silent (its job may be gone): read Slurm at once
    assert slurm.settled[-1] is False


def test_a_replica_on_a_draining_node_is_handed_over_then_cancelled(store: HistoryStore) -> None:
    serve(store, "llm", min_replicas=1, max_replicas=1)
    slurm = CachedSlurm()
    idle = dataclasses.replace(stats(0), running=0)
    ctl = controller(store, slurm=slurm, scrape=lambda url: idle)
    ctl.tick()
    slurm.queue[0] = msgspec.structs.replace(slurm.queue[0], nodes=("node5",))
    store.upsert_replica("llm", 0, url="http://node5:8000", host="node5", ready_at=NOW)
    ctl.tick()
    slurm.drained.add("node5")  # hpcserve drain-node node5
    ctl.tick()
    states = {r.index: r.state for r in store.replicas("llm")}
    assert states == {0: "ready", 1: "starting"}  # a successor first; the old one keeps serving meanwhile
    assert ctl.launcher.launched[-1] == ("llm", 1)  # type: ignore[attr-defined]
    slurm.queue[-1] = msgspec.structs.replace(slurm.queue[-1], nodes=("node6",))  # Slurm placed it elsewhere
    store.upsert_replica("llm", 1, url="http://node6:8000", host="node6", ready_at=NOW)
    ctl.tick()  # the successor becomes ready
    ctl.tick()  # and the old one drains
    assert {r.index: r.state for r in store.replicas("llm")} == {0: "draining", 1: "ready"}
    ctl.tick()  # nothing in flight on it: cancelled
    assert slurm.cancelled == [store_job(slurm, 0)]


def store_job(slurm: FakeSlurm, index: int) -> str:
    return next(j.id for j in slurm.queue if j.tag == replica_tag("llm", index))


def test_two_gateways_buffering_both_count_and_a_silent_one_drops_out(store: HistoryStore) -> None:
    from hpcserve.serving.gateway.stats import GatewaySample
    from hpcserve.serving.gateway_store import report_to_store

    serve(store, "llm", min_replicas=0, max_replicas=8, target_waiting_per_replica=2)
    ctl = controller(store)
    one, two = report_to_store(store, "login1:8000"), report_to_store(store, "login2:8000")
    one([GatewaySample(NOW - timedelta(seconds=1), "llm", 3, 0, 0.0)])
    two([GatewaySample(NOW - timedelta(seconds=2), "llm", 4, 0, 0.0)])
    two([GatewaySample(NOW - timedelta(seconds=30), "llm", 50, 0, 0.0)])  # old: not the newest of two
    assert ctl._gateway_waiting("llm", NOW) == 7  # 3 + 4, not the newest sample alone (3)
    ctl.tick()
    assert len(store.replicas("llm")) >= 1  # scaled from zero on both gateways' buffers
    later = NOW + timedelta(seconds=9)
    one([GatewaySample(later, "llm", 1, 0, 0.0)])  # login2 went silent 11 s ago: it drops out
    assert ctl._gateway_waiting("llm", later) == 1


def test_an_engine_that_stops_generating_with_requests_running_is_stalled() -> None:
    from dataclasses import replace

    from hpcserve.serving.controller import StallWatch

    watch = StallWatch(60.0)
    busy = replace(stats(0), running=3, generation_tokens_total=100.0)
    assert watch.update("llm", {0: busy, 1: busy}, NOW) == frozenset()
    moving = replace(busy, generation_tokens_total=180.0)
    assert watch.update("llm", {0: busy, 1: moving}, NOW + timedelta(seconds=59)) == frozenset()
    later = NOW + timedelta(seconds=61)
    assert watch.update("llm", {0: busy, 1: moving}, later) == frozenset({0})  # 1 moved 2 s ago
    idle = replace(busy, running=0)  # nothing running: an idle engine generates nothing, rightly
    assert watch.update("llm", {0: idle}, later + timedelta(seconds=90)) == frozenset()
    assert StallWatch(0.0).update("llm", {0: busy}, NOW + timedelta(days=1)) == frozenset()  # off


def test_a_stalled_replica_is_cancelled_and_replaced() -> None:
    from hpcserve.serving.reconciler import Cancel, Launch, Observed, ReplicaState, ReplicaView, reconcile
    from hpcserve.slurm.models import JobState

    running = job(10, "llm", 0)
    view = ReplicaView(0, "10", ReplicaState.READY, NOW, "http://node5:8000")
    seen = Observed({0: running}, {}, {0: 3}, stalled=frozenset({0}))
    assert reconcile(1, [view], seen, NOW, 600) == [
        Cancel(0, "10", "stalled: requests running, no token generated"),
        Launch(1),
    ]
    assert running.state is JobState.RUNNING
