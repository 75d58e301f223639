"""``lending: overlap`` at the serving controller's edge: what the pure pre-warm and victim choice need, read
from the history database and Slurm. Only built when the site's ``lending.mode`` is ``overlap``; in
``moves`` mode the controller gets none of it and behaves as before.

``PrewarmSource``: a deployment's floor per tick. The load history (``prewarm.load_history`` over the engine
samples of the last ``HISTORY_S``) is read again at most every ``REFRESH_S`` per deployment, so a tick does
not scan a week of samples; between refreshes the cached history's forecast is re-evaluated at ``now``.

``checkpoint_times``: the jobs' last checkpoints, from the markers ``ResumableTask`` and the templates touch
under ``$HPCSERVE_CHECKPOINT_DIR/<job id>`` (the site's ``lending.checkpoint_dir``, which hpcserve's submitter
exports to training jobs). Only a regular file owned by the job's own user counts. Limits: a folder the
service can read (a shared file system both see); jobs submitted without hpcserve must set the variable
themselves; an mtime is as true as the clocks of the node and the file server. A job without a marker is
counted from its start.

``GentleEvictor``: when a replica pends for Resources, the training jobs on the shared nodes that free its
GPUs most gently (``rebalance.victims``) get USR2 (``scancel --signal=USR2``: the job's steps) at once,
each once per service process, and the pending replica is pinned to their node (``ReqNodeList``), so
Slurm's own preemption (GraceTime, REQUEUE) frees that node, not one of its choosing. The timing
comes from pre-warm: the floor rises one horizon (>= grace + start) before the burst, so the replica pends,
and its victims are signalled, at about the burst's forecast time minus grace and start. Each signal logs
the victims' lost GPU-hours (GPUs x time since their last checkpoint), and each victim's is stored
(``lost_work``: ``hpcserve history --lost`` shows it). A victim recorded within its grace (and a minute)
is not signalled again, also by a restarted service.
"""

from __future__ import annotations

import logging
import pwd
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from hpcserve.rebalance.forecast import Sample
from hpcserve.serving.autoscaler import UP_UTILIZATION
from hpcserve.serving.prewarm import Forecasting, load_history, per_replica_capacity, prewarm_floor

if TYPE_CHECKING:
    from hpcserve.config import Policy
    from hpcserve.rebalance.victims import Eviction
    from hpcserve.slurm.models import Job
    from hpcserve.slurm.protocol import SlurmClient
    from hpcserve.store import Deployment, HistoryStore, LostWork

log = logging.getLogger("hpcserve.serving")

HISTORY_S = 7 * 86_400.0  # a week: the day-of-week profile needs every weekday once
REFRESH_S = 300.0
UNDER_WAY_MARGIN_S = 60.0  # after a victim's grace, Slurm requeues it within about a scheduling cycle


@dataclass
class PrewarmSource:
    store: HistoryStore
    horizon_s: float
    how: Forecasting = field(default_factory=Forecasting)
    cached: dict[str, tuple[datetime, list[Sample]]] = field(default_factory=dict)

    def __call__(self, deployment: Deployment, now: datetime) -> int:
        from hpcserve.serving.spec import DeploymentSpec

        spec = DeploymentSpec.model_validate(deployment.spec)
        history = self._history(deployment.name, now)
        capacity = per_replica_capacity(spec, UP_UTILIZATION)
        return prewarm_floor(spec, history, now, self.horizon_s, capacity, self.how)

    def _history(self, name: str, now: datetime) -> list[Sample]:
        read = self.cached.get(name)
        if read is None or (now - read[0]).total_seconds() >= REFRESH_S:
            since = now - timedelta(seconds=HISTORY_S)
            read = (now, load_history(self.store.engine_samples(name, since=since, until=now)))
            self.cached[name] = read
        return read[1]


def checkpoint_times(folder: Path, jobs: Iterable[tuple[str, str]]) -> dict[str, datetime]:
    """Each job's marker mtime in ``folder`` (UTC), for the ``(job id, user)`` pairs whose marker that user
    owns: a marker someone else wrote (to make another user's job look freshly saved, so it is evicted
    first) is ignored."""
    found: dict[str, datetime] = {}
    for job_id, user in jobs:
        try:
            info = (folder / job_id).lstat()
            uid = pwd.getpwnam(user).pw_uid
        except (OSError, ValueError, KeyError):
            continue
        if stat.S_ISREG(info.st_mode) and info.st_uid == uid:
            found[job_id] = datetime.fromtimestamp(info.st_mtime, UTC)
    return found


@dataclass
class GentleEvictor:
    client: SlurmClient
    policy: Policy
    shared_nodes: frozenset[str]
    checkpoint_dir: Path | None
    pin: Callable[[str, Sequence[str]], None] | None = None  # the pending replica onto the freed node
    store: HistoryStore | None = None  # records each victim's lost work; remembers evictions across restarts
    grace_s: float = 0.0  # the victims' GraceTime: an eviction recorded this recently is still under way
    signalled: set[str] = field(default_factory=set)

    def __call__(self, replica: Job, jobs: Sequence[Job], now: datetime) -> Eviction | None:
        """Signal the gentlest victims for ``replica`` (pending), unless some were already signalled."""
        from hpcserve.rebalance.victims import choose_eviction, lost_gpu_s

        shared = [j for j in jobs if self.shared_nodes.intersection(j.nodes)]
        if self._under_way(shared, now):
            return None  # an eviction is under way: its grace runs
        owned = [(j.id, j.user) for j in shared]
        marks = checkpoint_times(self.checkpoint_dir, owned) if self.checkpoint_dir else {}
        spare = self.policy.rebalance.spare_ending_within_s
        eviction = choose_eviction(shared, replica.gpus, marks, now, spare, self.policy)
        if eviction is None or not eviction.victims:
            return eviction
        victims = [j.id for j in eviction.victims]
        self.signalled.update(victims)
        if self.pin is not None:  # Slurm's preemption then frees exactly this node for the replica
            self.pin(replica.id, [eviction.node])
        self.client.cancel(victims, signal="USR2")
        node = eviction.node
        lost = [self._lost(v, node, replica, lost_gpu_s(v, marks, now), now) for v in eviction.victims]
        if self.store is not None:
            self.store.add_lost_work(lost)
        log.info("replica job %s: USR2 to %s on %s (lost %.2f GPU-h)", replica.id, ", ".join(victims),
                 eviction.node, eviction.lost_gpu_s / 3600)  # fmt: skip
        return eviction

    def _under_way(self, shared: Sequence[Job], now: datetime) -> bool:
        """A job still running on a shared node was signalled (by this process, or by the service before a
        restart, within its grace and a minute more)."""
        if any(j.id in self.signalled for j in shared):
            return True
        if self.store is None or not shared:
            return False
        since = now - timedelta(seconds=self.grace_s + UNDER_WAY_MARGIN_S)
        recent = self.store.lost_work(since=since, job_ids=[j.id for j in shared])
        self.signalled.update(r.job_id for r in recent)
        return bool(recent)

    @staticmethod
    def _lost(victim: Job, node: str, replica: Job, lost_s: float, now: datetime) -> LostWork:
        from hpcserve.serving.tags import parse_replica_tag
        from hpcserve.store import LostWork

        tag = parse_replica_tag(replica.tag)
        deployment = tag[0] if tag else replica.name
        return LostWork(now, victim.id, victim.user, node, victim.gpus, lost_s, deployment, replica.id)
