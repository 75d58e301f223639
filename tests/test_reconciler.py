"""The replica reconciler, purely: launches, readiness, replacement of dead replicas, drain before cancel; and
which tagged jobs are replicas at all (the recorded job id, run by the owner), whatever their tag says."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hpcserve.serving.reconciler import (
    Announcement,
    Cancel,
    Forget,
    Launch,
    Observed,
    Recorded,
    ReplicaState,
    ReplicaView,
    SetState,
    reconcile,
    trusted_jobs,
)
from hpcserve.slurm.models import Job, JobState

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
EARLIER = NOW - timedelta(seconds=30)


def job(
    job_id: int, state: JobState = JobState.RUNNING, start: datetime | None = EARLIER, user: str = "alice",
    node: str = "node5",
) -> Job:  # fmt: skip
    return Job(str(job_id), job_id, "d-r", user, "a", "infer", state, 1, nodes=(node,), start=start)


def note(index: int, job_id: int, at: datetime = NOW, host: str = "node5") -> Announcement:
    return Announcement(str(job_id), f"http://{host}:{8000 + index}", at, host)


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


def test_an_announcement_naming_another_node_than_the_jobs_is_not_believed() -> None:
    """The replica's own code announces: it must not send its deployment's traffic to another machine."""
    replicas = [view(0, 10, ReplicaState.STARTING)]
    elsewhere = note(0, 10, host="node6")  # another user's engine may serve there
    assert reconcile(1, replicas, seen({0: job(10, node="node5")}, {0: elsewhere}), NOW, 600) == []
    fqdn = note(0, 10, host="node5.cluster.example")  # the node's full name is the node
    actions = reconcile(1, replicas, seen({0: job(10)}, {0: fqdn}), NOW, 600)
    assert actions == [SetState(0, ReplicaState.READY, "http://node5.cluster.example:8000")]


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


def test_unrecorded_tagged_job_is_never_adopted() -> None:
    """A tagged job the service did not submit: not a replica, and the wanted one is launched anyway."""
    trusted, ignored = trusted_jobs("alice", [], [job(13, JobState.PENDING, start=None)])
    assert trusted == {} and [j.job_id for j in ignored] == [13]
    assert reconcile(1, [], seen(trusted), NOW, 600) == [Launch(0)]


def test_only_the_recorded_job_of_the_owner_is_trusted() -> None:
    recorded = [Recorded(0, "10"), Recorded(1, "11"), Recorded(2, None)]
    jobs = [job(10), job(99, user="bob"), job(11, user="bob"), job(12)]
    trusted, ignored = trusted_jobs("alice", recorded, jobs)
    assert {i: j.job_id for i, j in trusted.items()} == {0: 10}  # 11 is recorded, but bob runs it
    assert sorted(j.job_id for j in ignored) == [11, 12, 99]


def test_a_job_with_the_same_tag_cannot_hide_the_replica() -> None:
    """bob's job tagged as replica 0 comes after alice's in squeue's output: replica 0 stays alice's."""
    trusted, _ = trusted_jobs("alice", [Recorded(0, "10")], [job(10), job(20, user="bob")])
    assert reconcile(1, [view(0, 10)], seen(trusted), NOW, 600) == []


def test_steady_state_does_nothing() -> None:
    assert reconcile(2, [view(0, 10), view(1, 11)], seen({0: job(10), 1: job(11)}), NOW, 600) == []


def limited(job_id: int, limit_s: int, started: datetime = EARLIER) -> Job:
    return Job(str(job_id), job_id, "d-r", "alice", "a", "infer", JobState.RUNNING, 1, nodes=("node5",),
               start=started, time_limit_s=limit_s)  # fmt: skip


def test_a_replica_near_its_time_limit_hands_over_without_a_gap() -> None:
    renew = 120.0
    old = limited(10, 300)  # started 30 s ago, 5 minutes: ends in 270 s
    assert reconcile(1, [view(0, 10)], seen({0: old}), NOW, 600, renew) == []  # not yet within 120 s
    later = NOW + timedelta(seconds=160)  # ends in 110 s: a successor starts; the old one keeps serving
    assert reconcile(1, [view(0, 10)], seen({0: old}), later, 600, renew) == [Launch(1)]
    starting = [view(0, 10), view(1, 11, ReplicaState.STARTING)]
    both = seen({0: old, 1: limited(11, 300, later)}, {1: note(1, 11, later)}, {0: 3})
    acts = reconcile(1, starting, both, later + timedelta(seconds=5), 600, renew)
    assert acts == [SetState(1, ReplicaState.READY, "http://node5:8001")]  # still no drain, no 2nd launch
    ready = [view(0, 10), view(1, 11)]
    acts = reconcile(1, ready, both, later + timedelta(seconds=10), 600, renew)
    assert acts == [SetState(0, ReplicaState.DRAINING)]  # the successor serves: the old one drains
    draining = [view(0, 10, ReplicaState.DRAINING), view(1, 11)]
    assert reconcile(1, draining, both, later + timedelta(seconds=15), 600, renew) == []  # 3 in flight
    empty = seen({0: old, 1: limited(11, 300, later)}, inflight={0: 0})
    assert reconcile(1, draining, empty, later + timedelta(seconds=20), 600, renew) == [
        Cancel(0, "10", "drained")
    ]


def test_no_renewal_when_the_limit_is_far_or_unknown() -> None:
    assert reconcile(1, [view(0, 10)], seen({0: limited(10, 43200)}), NOW, 600, 900) == []
    assert reconcile(1, [view(0, 10)], seen({0: job(10)}), NOW, 600, 900) == []  # no time limit seen
    assert reconcile(1, [view(0, 10)], seen({0: limited(10, 60)}), NOW, 600, 0) == []  # renewal off
    short = limited(10, 120)  # 2 minutes, 30 s in: half its limit (60 s) is the margin, not 900 s
    assert reconcile(1, [view(0, 10)], seen({0: short}), NOW, 600, 900) == []
    assert reconcile(1, [view(0, 10)], seen({0: short}), NOW + timedelta(seconds=31), 600, 900) == [Launch(1)]
