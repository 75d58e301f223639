"""One Slurm read per tick, shared (``hpcserve.slurm.shared_view``): every reader within a tick gets the same
squeue + sinfo; the age adapts to a slow read; writes pass through and drop the cache; a failing Slurm is
retried with backoff, not by every caller."""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from hpcserve.errors import SlurmCommandError
from hpcserve.model.cluster import Job, JobState, Node, Partition, Switch, Topology
from hpcserve.slurm.protocol import JobFilter
from hpcserve.slurm.shared_view import MAX_BACKOFF_S, SharedView

DOWN = "slurm_load_jobs error: Unable to contact slurm controller"


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class CountingSlurm:
    clock: Clock
    calls: list[str] = field(default_factory=list)
    read_s: float = 0.0  # how long squeue takes (the clock moves by it)
    down: bool = False

    def jobs(self, filt: JobFilter | None = None) -> list[Job]:
        self.calls.append("squeue" if filt is None else "squeue-user")
        if self.down:
            raise SlurmCommandError(
                ["squeue"], 1, "slurm_load_jobs error: Unable to contact slurm controller"
            )
        self.clock.now += self.read_s
        return [Job("1", 1, "j", "bob", "a", "train", JobState.RUNNING, 1, ("n1",), gpus=4)]

    def nodes(self) -> list[Node]:
        self.calls.append("sinfo")
        return [Node("n1", "mixed", gpus_total=8, gpus_alloc=4)]

    def partitions(self) -> list[Partition]:
        self.calls.append("partitions")
        return [Partition("train", ("n1",))]

    def topology(self) -> Topology:
        self.calls.append("topology")
        return Topology((Switch("leaf1", 0, ("n1",)),))

    def cancel(self, job_ids: list[str], *, signal: str | None = None) -> None:
        self.calls.append("scancel")


def view(read_s: float = 0.0) -> tuple[SharedView, CountingSlurm, Clock]:
    clock = Clock()
    slurm = CountingSlurm(clock, read_s=read_s)
    return SharedView(slurm, 2.0, partitions_ttl_s=60, topology_ttl_s=3600, clock=clock), slurm, clock


def test_every_reader_within_a_tick_shares_one_squeue_and_one_sinfo() -> None:
    shared, slurm, clock = view()
    controller, sampler = shared.jobs(), (shared.jobs(), shared.nodes())
    snapshot = shared.snapshot()  # the planner's and the submitter's: the same read, the topology cached
    assert controller == sampler[0] and list(snapshot.jobs) == controller
    assert snapshot.nodes[0].switch == "leaf1"
    assert slurm.calls == ["squeue", "sinfo", "topology", "partitions"]
    clock.now += 1.9
    shared.snapshot()
    assert slurm.calls.count("squeue") == 1 and shared.reads == 2
    clock.now += 0.2  # a tick later: one new read; partitions and topology keep their own ages
    shared.jobs()
    shared.snapshot()
    assert slurm.calls == ["squeue", "sinfo", "topology", "partitions", "squeue", "sinfo"]
    clock.now += 2.1  # a tick in which only the controller reads: squeue alone
    shared.jobs()
    assert slurm.calls[6:] == ["squeue"]


def test_a_slow_read_is_reused_longer() -> None:
    shared, slurm, clock = view(read_s=1.5)  # a huge queue: squeue takes 1.5 s
    shared.jobs()
    clock.now += 14.0  # < 10 x 1.5 s: still this read
    shared.jobs()
    assert slurm.calls.count("squeue") == 1
    clock.now += 1.1
    shared.jobs()
    assert slurm.calls.count("squeue") == 2


def test_writes_pass_through_and_the_next_reader_sees_slurm_again() -> None:
    shared, slurm, _ = view()
    shared.jobs()
    shared.cancel(["1"])
    shared.jobs()
    assert slurm.calls == ["squeue", "scancel", "squeue"]
    shared.jobs(JobFilter(user="bob"))  # a filtered read is the caller's own
    assert slurm.calls[-1] == "squeue-user"
    assert shared.live is slurm


def test_a_down_slurm_is_retried_with_backoff_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    shared, slurm, clock = view()
    slurm.down = True
    caplog.set_level(logging.INFO, "hpcserve.slurm")
    for _ in range(3):  # the controller, the sampler and the planner in one tick: one RPC
        with pytest.raises(SlurmCommandError):
            shared.jobs()
    assert slurm.calls == ["squeue"]
    for _ in range(200):  # 100 s of callers every 0.5 s: an RPC after 2, 4, 8, 16, 32 and 60 s
        clock.now += 0.5
        with pytest.raises(SlurmCommandError):
            shared.jobs()
    assert slurm.calls == ["squeue"] * 6
    assert [r.levelno for r in caplog.records] == [logging.WARNING]  # one line, not one per failed read
    slurm.down = False
    clock.now += MAX_BACKOFF_S
    assert shared.jobs()[0].id == "1"
    assert caplog.records[-1].message == "Slurm reads work again"


def test_backoff_doubles_up_to_its_cap() -> None:
    shared, slurm, clock = view()
    slurm.down = True
    times: list[float] = []
    for _ in range(9):
        before = len(slurm.calls)
        while len(slurm.calls) == before:
            clock.now += 0.25
            with contextlib.suppress(SlurmCommandError):
                shared.jobs()
        times.append(clock.now)
    gaps = [round(b - a) for a, b in itertools.pairwise(times)]
    assert gaps[:5] == [2, 4, 8, 16, 32] and set(gaps[5:]) == {MAX_BACKOFF_S}


def test_a_calm_controller_lets_its_own_reads_age_to_calm_s_and_anything_moving_reads_at_once() -> None:
    clock = Clock()
    slurm = CountingSlurm(clock)
    shared = SharedView(slurm, 2.0, calm_s=10.0, clock=clock)
    shared.calm_jobs()
    shared.settle(True)  # every replica ready and answering: the controller's list may be 10 s old
    for _ in range(4):
        clock.now += 2.0
        shared.calm_jobs()
    assert slurm.calls.count("squeue") == 1
    shared.jobs()  # the sampler and the planner still get a list at most one tick old
    assert slurm.calls.count("squeue") == 2
    clock.now += 2.0
    shared.calm_jobs()
    assert slurm.calls.count("squeue") == 2
    clock.now += 2.0
    shared.settle(False)  # a replica stopped answering: the next read is fresh
    shared.calm_jobs()
    assert slurm.calls.count("squeue") == 3
    shared.settle(True)
    shared.cancel(["7"])  # a write drops the cache and ends the calm
    assert shared.calm is False
    clock.now += 2.0
    shared.calm_jobs()
    assert slurm.calls.count("squeue") == 4


def test_while_calm_the_sampler_and_the_planner_share_the_controllers_read_dated_when_read() -> None:
    clock = Clock()
    slurm = CountingSlurm(clock)
    shared = SharedView(slurm, 2.0, calm_s=10.0, clock=clock)
    planner = shared.calm_reader(20.0)
    shared.calm_jobs()
    shared.settle(True)
    clock.now += 4.0
    at, jobs, nodes = shared.timed_read(30.0)  # the sampler: the controller's squeue, 4 s old
    assert slurm.calls == ["squeue", "sinfo"] and len(jobs) == len(nodes) == 1
    assert 3.0 < (datetime.now(UTC) - at).total_seconds() < 5.0  # dated by the older read, not now
    planner.snapshot()
    assert slurm.calls == ["squeue", "sinfo", "topology", "partitions"]
    shared.jobs()  # the replica submitter: at most one tick old
    assert slurm.calls[4:] == ["squeue"]
    clock.now += 6.0
    shared.timed_read(5.0)  # a sampler every 5 s takes nothing older than its period
    assert slurm.calls[5:] == ["squeue", "sinfo"]
    shared.settle(False)  # something moves: the planner reads a tick-fresh list
    clock.now += 2.0
    planner.snapshot()
    assert slurm.calls[7:] == ["squeue", "sinfo"]
    shared.settle(True)
    planner.invalidate()  # the rebalancer's executor wrote: everyone reads again
    shared.timed_read(30.0)
    assert slurm.calls[9:] == ["squeue", "sinfo"]
