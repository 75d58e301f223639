"""lending: overlap at the serving controller: the pre-warm floor read from the stored engine samples, the
controller launching replicas up to it, and a pending replica's gentlest victims getting USR2 once (moves
mode has neither: ``prewarm`` and ``evict`` None)."""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest

from hpcserve.config import load_policy
from hpcserve.serving.overlap import GentleEvictor, PrewarmSource
from hpcserve.slurm.models import Job, JobState, Node
from hpcserve.store import EngineSample, HistoryStore
from tests.conftest import POLICY
from tests.test_serving_controller import NOW, FakeSlurm, controller, job, serve

P = load_policy(POLICY)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[HistoryStore]:
    with HistoryStore(f"sqlite:///{tmp_path}/h.db", admins=["root"]) as s:
        s.upgrade()
        yield s


def test_controller_launches_up_to_the_forecast_floor(db: HistoryStore) -> None:
    serve(db, "llm")  # min_replicas 0, no traffic: the autoscaler alone wants none
    ctl = controller(db)
    ctl.tick()
    assert db.replicas("llm") == []
    ctl.prewarm = lambda deployment, now: 3
    ctl.tick()
    assert sorted(r.index for r in db.replicas("llm")) == [0, 1, 2]
    assert db.get_deployment("llm").desired_replicas == 3  # type: ignore[union-attr]


def test_prewarm_source_forecasts_the_stored_daily_burst(db: HistoryStore) -> None:
    serve(db, "llm", max_replicas=8)
    burst = NOW.replace(hour=14, minute=0)
    start = burst - timedelta(days=3)
    rows = []
    for k in range(3 * 86_400 // 600):
        at = start + timedelta(seconds=600 * k)
        rows.append(EngineSample(at, "llm", 0, waiting=0, running=40 if at.hour == 14 else 1))
        rows.append(EngineSample(at, "llm", None, gateway_waiting=0))
    db.add_engine_samples(rows)
    deployment = db.get_deployment("llm")
    assert deployment is not None
    source = PrewarmSource(db, horizon_s=1200)
    quiet = source(deployment, burst - timedelta(hours=4))
    assert quiet <= 1
    source.cached.clear()
    ahead = source(deployment, burst - timedelta(seconds=600))
    assert ahead >= 2  # 40 running, a simulator replica runs about 9 at 90%: several replicas ahead of it


@dataclass
class SignalSlurm(FakeSlurm):
    signals: list[tuple[str, str | None]] = field(default_factory=list)

    def cancel(self, job_ids: list[str], *, signal: str | None = None) -> None:
        if signal is None:
            super().cancel(job_ids)
        else:
            self.signals += [(i, signal) for i in job_ids]


def training(job_id: int, node: str, started_h: float) -> Job:
    return Job(str(job_id), job_id, f"t{job_id}", "bob", "acct", "train", JobState.RUNNING, 1, (node,),
               gpus=8, start=NOW - timedelta(hours=started_h), time_limit_s=24 * 3600)  # fmt: skip


def test_pending_replica_gets_the_gentlest_victims_signalled_once(db: HistoryStore, tmp_path: Path) -> None:
    serve(db, "llm", min_replicas=1)
    db.upsert_replica("llm", 0, job_id="600", state="starting", started_at=NOW)
    pending = msgspec.structs.replace(
        job(600, "llm", 0), state=JobState.PENDING, reason="Resources", start=None
    )
    young, old, elsewhere = training(1, "g1", 1), training(2, "g2", 9), training(3, "n9", 0.1)
    slurm = SignalSlurm([pending, young, old, elsewhere])
    (tmp_path / "2").touch()  # job 2 checkpointed a minute ago: it goes first, though it is the oldest
    os.chown(tmp_path / "2", pwd.getpwnam("bob").pw_uid, -1)  # bob's marker for bob's job
    marked = (NOW - timedelta(seconds=60)).timestamp()
    os.utime(tmp_path / "2", (marked, marked))
    ctl = controller(db, slurm=slurm)
    pins: list[tuple[str, list[str]]] = []
    evict = GentleEvictor(slurm, P, frozenset({"g1", "g2"}), tmp_path,  # type: ignore[arg-type]
                          pin=lambda job_id, nodes: pins.append((job_id, list(nodes))))  # fmt: skip
    ctl.evict = evict
    ctl.tick()
    ctl.tick()
    assert slurm.signals == [("2", "USR2")]
    assert pins == [("600", ["g2"])]  # the replica may start only where its victim frees GPUs
    assert slurm.cancelled == []


def test_moves_mode_signals_nothing(db: HistoryStore) -> None:
    serve(db, "llm", min_replicas=1)
    db.upsert_replica("llm", 0, job_id="600", state="starting", started_at=NOW)
    pending = msgspec.structs.replace(
        job(600, "llm", 0), state=JobState.PENDING, reason="Resources", start=None
    )
    slurm = SignalSlurm([pending, training(1, "g1", 1)])
    controller(db, slurm=slurm).tick()
    assert slurm.signals == []


def test_each_victims_lost_work_is_stored_and_a_restart_does_not_signal_again(
    db: HistoryStore, tmp_path: Path
) -> None:
    serve(db, "llm", min_replicas=1)
    pending = msgspec.structs.replace(
        job(600, "llm", 0), state=JobState.PENDING, reason="Resources", start=None
    )
    victim = training(2, "g2", 2)  # no marker: it loses everything since its start, 8 GPUs x 2 h
    slurm = SignalSlurm([pending, victim])
    first = GentleEvictor(slurm, P, frozenset({"g2"}), tmp_path, store=db, grace_s=120)  # type: ignore[arg-type]
    assert first(pending, [victim], NOW) is not None
    [row] = db.lost_work()
    assert (row.job_id, row.user, row.node, row.gpus, row.deployment, row.replica_job_id) == (
        "2",
        "bob",
        "g2",
        8,
        "llm",
        "600",
    )
    assert row.lost_gpu_h == pytest.approx(16.0)
    restarted = GentleEvictor(slurm, P, frozenset({"g2"}), tmp_path, store=db, grace_s=120)  # type: ignore[arg-type]
    assert restarted(pending, [victim], NOW + timedelta(seconds=100)) is None  # its grace still runs
    assert slurm.signals == [("2", "USR2")]
    later = GentleEvictor(slurm, P, frozenset({"g2"}), tmp_path, store=db, grace_s=120)  # type: ignore[arg-type]
    assert later(pending, [victim], NOW + timedelta(seconds=400)) is not None  # long past: a new eviction
    assert [r.job_id for r in db.lost_work(since=NOW + timedelta(seconds=1))] == ["2"]


@dataclass
class HoldSlurm(SignalSlurm):
    """Signals, node GPUs free, and which held jobs were released."""

    free: dict[str, int] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)

    def nodes(self) -> list[Node]:
        return [Node(name, "mixed", gpus_total=8, gpus_alloc=8 - free) for name, free in self.free.items()]

    def release(self, job_ids: Sequence[str]) -> None:
        self.released += job_ids


def test_a_held_replica_is_released_as_it_is_where_gpus_are_free_else_after_its_victims(
    db: HistoryStore, tmp_path: Path
) -> None:
    held = msgspec.structs.replace(
        job(600, "llm", 0), state=JobState.PENDING, reason="JobHeldUser", start=None
    )
    victim = training(2, "g2", 2)
    pins: list[tuple[str, list[str]]] = []

    def evictor(slurm: HoldSlurm) -> GentleEvictor:
        pin = lambda j, n: pins.append((j, list(n)))  # noqa: E731
        return GentleEvictor(slurm, P, frozenset({"g2"}), tmp_path, pin, db, 120,  # type: ignore[arg-type]
                             inference_nodes=frozenset({"g2", "i1"}), release=slurm.release)  # fmt: skip

    roomy = HoldSlurm([held, victim], free={"i1": 8, "g2": 0})
    assert evictor(roomy)(held, [victim], NOW) is None
    assert (roomy.released, roomy.signals, pins, db.lost_work()) == (["600"], [], [], [])
    full = HoldSlurm([held, victim], free={"i1": 0, "g2": 0})
    chosen = evictor(full)(held, [victim], NOW)
    assert chosen is not None and chosen.node == "g2"
    assert (full.released, full.signals, pins) == (["600"], [("2", "USR2")], [("600", ["g2"])])
    pending = msgspec.structs.replace(held, reason="Resources")  # released, pinned, its victim in its grace
    again = HoldSlurm([pending], free={"i1": 0, "g2": 0})
    assert evictor(again)(pending, [], NOW + timedelta(seconds=30)) is None  # the victim left: still no 2nd
    assert again.signals == [] and len(db.lost_work()) == 1


def test_at_the_policys_cap_a_held_replica_may_start_on_inferences_own_nodes_only(
    db: HistoryStore, tmp_path: Path
) -> None:
    held = msgspec.structs.replace(
        job(601, "llm", 1), state=JobState.PENDING, reason="JobHeldUser", start=None
    )
    running = msgspec.structs.replace(job(600, "llm", 0), nodes=("g1",))  # replica 0 already on shared g1
    victim = training(2, "g2", 2)
    capped = P.model_copy(update={"rebalance": P.rebalance.model_copy(update={"max_inference_nodes": 2})})
    slurm = HoldSlurm([held, running, victim], free={"i1": 0, "g1": 0, "g2": 0})
    pins: list[tuple[str, list[str]]] = []
    evict = GentleEvictor(slurm, capped, frozenset({"g1", "g2"}), tmp_path,  # type: ignore[arg-type]
                          lambda j, n: pins.append((j, list(n))), db, 120,
                          inference_nodes=frozenset({"i1", "g1", "g2"}), release=slurm.release)  # fmt: skip
    assert evict(held, [held, running, victim], NOW) is None  # i1 + g1 = 2 = the cap: g2 stays training's
    assert (slurm.signals, pins, slurm.released) == ([], [("601", ["i1"])], ["601"])
