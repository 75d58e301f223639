"""The replica reconciler, purely: launches, readiness, replacement of dead replicas, drain before cancel."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hpcserve.serving.reconciler import (
    Adopt,
    Cancel,
    Forget,
    Launch,
    Observed,
    ReplicaState,
    ReplicaView,
    SetState,
    reconcile,
)
from hpcserve.serving.replica import Announcement
from hpcserve.slurm.models import Job, JobState

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
EARLIER = NOW - timedelta(seconds=30)


def job(job_id: int, state: JobState = JobState.RUNNING, start: datetime | None = EARLIER) -> Job:
    return Job(str(job_id), job_id, "d-r", "alice", "a", "infer", state, 1, start=start)


def note(index: int, job_id: int, at: datetime = NOW) -> Announcement:
    return Announcement(
        "d", index, str(job_id), "node5", 8000 + index, f"http://node5:{8000 + index}", at.isoformat()
    )


def view(index: int, job_id: int, state: ReplicaState = ReplicaState.READY) -> ReplicaView:
    return ReplicaView(index, str(job_id), state, EARLIER, f"http://node5:{8000 + index}")


def seen(jobs: dict[int, Job], announced: dict[int, Announcement] | None = None,
         inflight: dict[int, int] | None = None) -> Observed:  # fmt: skip
    return Observed(jobs, announced or {}, inflight or {})


def test_launches_up_to_desired_from_nothing() -> None:
    assert reconcile(2, [], seen({}), NOW, 600) == [Launch(0), Launch(1)]


def test_announced_replica_becomes_ready() -> None:
    replicas = [view(0, 10, ReplicaState.STARTING)]
    actions = reconcile(1, replicas, seen({0: job(10)}, {0: note(0, 10)}), NOW, 600)
    assert actions == [SetState(0, ReplicaState.READY, "http://node5:8000")]


def test_stale_announcement_of_a_requeued_job_is_ignored() -> None:
    replicas = [view(0, 10, ReplicaState.STARTING)]
    stale = note(0, 10, at=EARLIER - timedelta(seconds=60))
    assert reconcile(1, replicas, seen({0: job(10)}, {0: stale}), NOW, 600) == []


def test_dead_replica_is_forgotten_and_replaced() -> None:
    replicas = [view(0, 10), view(1, 11)]
    actions = reconcile(2, replicas, seen({1: job(11), 0: job(10, JobState.CANCELLED)}), NOW, 600)
    assert actions == [Forget(0, "its Slurm job ended"), Launch(2)]


def test_scale_down_drains_ready_replicas_and_cancels_only_when_empty() -> None:
    replicas = [view(0, 10), view(1, 11)]
    jobs = {0: job(10), 1: job(11)}
    first = reconcile(1, replicas, seen(jobs, inflight={0: 3, 1: 1}), NOW, 600)
    assert first == [SetState(1, ReplicaState.DRAINING)]  # the one with fewer requests in flight
    draining = [view(0, 10), view(1, 11, ReplicaState.DRAINING)]
    assert reconcile(1, draining, seen(jobs, inflight={0: 3, 1: 2}), NOW, 600) == []
    assert reconcile(1, draining, seen(jobs, inflight={0: 3, 1: 0}), NOW, 600) == [Cancel(1, "11", "drained")]


def test_queued_replicas_go_first_and_at_once() -> None:
    replicas = [view(0, 10), view(1, 11, ReplicaState.STARTING)]
    jobs = {0: job(10), 1: job(11, JobState.PENDING, start=None)}
    assert reconcile(1, replicas, seen(jobs), NOW, 600) == [Cancel(1, "11", "not needed")]


def test_replica_that_never_gets_ready_is_cancelled() -> None:
    replicas = [view(0, 10, ReplicaState.STARTING)]
    actions = reconcile(1, replicas, seen({0: job(10)}), NOW, ready_timeout_s=10)
    assert actions == [Cancel(0, "10", "not ready after 10s"), Launch(1)]


def test_orphan_job_is_adopted_not_duplicated() -> None:
    assert reconcile(1, [], seen({3: job(13, JobState.PENDING, start=None)}), NOW, 600) == [Adopt(3, "13")]


def test_steady_state_does_nothing() -> None:
    assert reconcile(2, [view(0, 10), view(1, 11)], seen({0: job(10), 1: job(11)}), NOW, 600) == []
