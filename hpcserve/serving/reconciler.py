"""The replica reconciler: desired replicas against the actual ones (the Slurm jobs tagged with the
deployment), as a pure function that returns actions. The controller applies them (sbatch, scancel, the
database) and calls it again next tick, so a crash between two actions is repaired by the next pass.

Replica lifecycle: ``starting`` (job queued or engine loading) -> ``ready`` (announced and healthy; the
gateway routes to it) -> ``draining`` (no new requests; cancelled once nothing is in flight) -> gone.
A replica whose job ended, or that never became ready in time, is dropped and, if still wanted, replaced;
so is one whose engine stalled (requests running, no token generated for ``serving.stall_s``).

Handover before the time limit: a replica whose job ends within ``renew_before_s`` (its start plus its time
limit) no longer counts as capacity, so a successor is launched while it still serves; once enough other
replicas are ready, it drains (no new requests, cancelled when none is in flight) before Slurm would kill
it. ``renew_before_s`` must cover a replica's start and its longest request.

Trust: a job is a replica only when the service submitted it (its id is the one recorded for that replica)
and Slurm runs it as the deployment's owner (``trusted_jobs``). A tag in ``--comment`` proves nothing, as
anyone may write it: another job tagged with the deployment is ignored, never adopted nor routed to, and
cannot hide the real replica. The announcement (``host:port``) is the one the replica made to the service's
API with its secret, as the store recorded it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from hpcserve.model.cluster import Job, JobState


class ReplicaState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"

    @property
    def counts_as_capacity(self) -> bool:
        return self is not ReplicaState.DRAINING


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """A replica as the database knows it."""

    index: int
    job_id: str
    state: ReplicaState
    started_at: datetime
    url: str | None = None


@dataclass(frozen=True, slots=True)
class Launch:
    index: int


@dataclass(frozen=True, slots=True)
class Cancel:
    index: int
    job_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class SetState:
    index: int
    state: ReplicaState
    url: str | None = None


@dataclass(frozen=True, slots=True)
class Forget:
    index: int
    reason: str


Action = Launch | Cancel | SetState | Forget


@dataclass(frozen=True, slots=True)
class Announcement:
    """What a replica announced to the service (with its secret): where it serves, from which job, when."""

    job_id: str
    url: str
    at: datetime
    host: str = ""  # the host it named: it must be one of its job's nodes


@dataclass(frozen=True, slots=True)
class Observed:
    """What the controller saw this tick: the replicas' own live jobs by index (``trusted_jobs``), their
    announcements, in-flight requests."""

    jobs: Mapping[int, Job]
    announced: Mapping[int, Announcement]
    inflight: Mapping[int, int]
    reserved: frozenset[int] = frozenset()  # indices still held by cancelled replicas' jobs: not reused
    stalled: frozenset[int] = frozenset()  # engines that generated nothing for a while with requests running
    leaving: frozenset[int] = frozenset()  # replicas whose node is draining (maintenance): they move off it


@dataclass(frozen=True, slots=True)
class Recorded:
    """A replica row as far as trust goes: its index and the job id the service recorded at submit."""

    index: int
    job_id: str | None


def trusted_jobs(
    owner: str, recorded: Sequence[Recorded], jobs: Sequence[Job]
) -> tuple[dict[int, Job], list[Job]]:
    """The deployment's tagged ``jobs`` split into the replicas' own (by index: the recorded job id, run by
    ``owner``) and the others, which are to be ignored."""
    ours = {r.job_id.split("_")[0]: r.index for r in recorded if r.job_id}
    trusted: dict[int, Job] = {}
    ignored: list[Job] = []
    for job in jobs:
        index = ours.get(str(job.job_id))
        if index is not None and job.user == owner:
            trusted[index] = job
        else:
            ignored.append(job)
    return trusted, ignored


def reconcile(
    desired: int,
    replicas: Sequence[ReplicaView],
    seen: Observed,
    now: datetime,
    ready_timeout_s: float,
    renew_before_s: float = 0.0,
) -> list[Action]:
    """Actions that move the replicas toward ``desired``; empty when they are there."""
    actions: list[Action] = []
    alive: list[ReplicaView] = []
    for replica in replicas:
        step = _check(replica, seen, now, ready_timeout_s)
        actions += step
        if not any(isinstance(a, Forget | Cancel) for a in step):
            alive.append(replica)
    expiring = [r for r in alive if _expiring(r, seen, now, renew_before_s) or _leaving(r, seen)]
    staying = [r for r in alive if r not in expiring]
    known = {r.index for r in replicas}
    actions += _resize(desired, staying, seen, known | set(seen.jobs) | seen.reserved)
    return actions + _hand_over(desired, expiring, staying)


def _expiring(replica: ReplicaView, seen: Observed, now: datetime, renew_before_s: float) -> bool:
    """A serving replica whose job ends (start + time limit) within ``renew_before_s``, or within half its
    time limit when that is shorter (a short-lived replica is not replaced as soon as it starts)."""
    job = seen.jobs.get(replica.index)
    if renew_before_s <= 0 or job is None or job.start is None or job.time_limit_s is None:
        return False
    left = job.time_limit_s - (now - job.start).total_seconds()
    return replica.state is ReplicaState.READY and left <= min(renew_before_s, job.time_limit_s / 2)


def _leaving(replica: ReplicaView, seen: Observed) -> bool:
    """A serving replica on a node being drained: handed over like one near its time limit."""
    return replica.state is ReplicaState.READY and replica.index in seen.leaving


def _hand_over(desired: int, expiring: list[ReplicaView], staying: list[ReplicaView]) -> list[Action]:
    """Expiring replicas drain once their successors are ready: as many as the ready others cover."""
    ready = sum(1 for r in staying if r.state is ReplicaState.READY)
    spare = max(0, min(len(expiring), ready + len(expiring) - desired))  # serving stays >= desired
    oldest = sorted(expiring, key=lambda r: r.started_at)
    return [SetState(r.index, ReplicaState.DRAINING) for r in oldest[:spare]]


def _check(replica: ReplicaView, seen: Observed, now: datetime, timeout_s: float) -> list[Action]:
    job = seen.jobs.get(replica.index)
    if job is None or job.job_id != int(replica.job_id.split("_")[0]) or job.state.is_terminal:
        return [Forget(replica.index, "its Slurm job ended")]
    if replica.index in seen.stalled and replica.state is not ReplicaState.STARTING:
        return [Cancel(replica.index, replica.job_id, "stalled: requests running, no token generated")]
    if replica.index in seen.leaving and replica.state is ReplicaState.STARTING:
        return [Cancel(replica.index, replica.job_id, "its node is draining; starting elsewhere")]
    if replica.state is ReplicaState.DRAINING:
        if seen.inflight.get(replica.index, 0) == 0:
            return [Cancel(replica.index, replica.job_id, "drained")]
        return []
    note = seen.announced.get(replica.index)
    if note is not None and _current(note, job) and replica.state is ReplicaState.STARTING:
        return [SetState(replica.index, ReplicaState.READY, note.url)]
    waited = (now - replica.started_at).total_seconds()
    if replica.state is ReplicaState.STARTING and job.state == JobState.RUNNING and waited > timeout_s:
        return [Cancel(replica.index, replica.job_id, f"not ready after {timeout_s:g}s")]
    return []


def _current(note: Announcement, job: Job) -> bool:
    """The announcement is from this job's current run (a requeued job keeps its id but starts again), and
    names one of the nodes Slurm gave that job: a replica cannot point its deployment's traffic at another
    machine (or another user's engine elsewhere)."""
    if note.job_id.split("_")[0] != str(job.job_id):
        return False
    if job.nodes and note.host.split(".")[0] not in job.nodes:
        return False
    return job.start is None or note.at >= job.start


def _resize(desired: int, alive: list[ReplicaView], seen: Observed, used: set[int]) -> list[Action]:
    capacity = [r for r in alive if r.state.counts_as_capacity]
    if len(capacity) < desired:
        return [Launch(i) for i in _free_indices(used, desired - len(capacity))]
    surplus = len(capacity) - desired
    return [_shrink(r, seen) for r in sorted(capacity, key=lambda r: _shrink_order(r, seen))[:surplus]]


def _shrink_order(replica: ReplicaView, seen: Observed) -> tuple[int, int, int]:
    """Cheapest first: queued jobs, then loading engines, then ready ones with the fewest requests."""
    job = seen.jobs.get(replica.index)
    queued = job is not None and job.state.is_pending
    rank = 0 if queued else (1 if replica.state is ReplicaState.STARTING else 2)
    return rank, seen.inflight.get(replica.index, 0), -replica.index


def _shrink(replica: ReplicaView, seen: Observed) -> Action:
    if replica.state is ReplicaState.READY:
        return SetState(replica.index, ReplicaState.DRAINING)  # stop routing first; cancel once empty
    return Cancel(replica.index, replica.job_id, "not needed")


def _free_indices(used: set[int], count: int) -> list[int]:
    free: list[int] = []
    candidate = 0
    while len(free) < count:
        if candidate not in used:
            free.append(candidate)
        candidate += 1
    return free
