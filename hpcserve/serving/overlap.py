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

``GentleEvictor``: replicas are submitted held (``JobHeldUser``), so that Slurm's scheduler does not pick its
own victims at submission. A held replica that fits free GPUs is released as it is. Otherwise (or when a
replica pends for Resources) the training jobs on the shared nodes that free its GPUs most gently
(``rebalance.victims``) get USR2 at once (the batch shell when it traps USR2, as the templates' does, else
the job's steps: the rebalancer's rule), the replica is pinned to their node (``ReqNodeList``) and released,
so Slurm's own preemption (GraceTime, REQUEUE) frees that node, not one of its choosing. The timing comes
from pre-warm: the floor rises one horizon (>= grace + start) before the burst, so the replica is submitted,
and its victims signalled, at about the burst's forecast time minus grace and start. Each victim's lost
GPU-hours (GPUs x time since its last checkpoint) are logged and stored (``lost_work``: ``hpcserve history
--lost`` shows them). While an eviction is under way (within the victims' grace and a minute) neither the
replica nor its victims get another one, also from a restarted service (the store remembers).
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
from hpcserve.serving.controller import HELD
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
    inference_nodes: frozenset[str] = frozenset()  # where a replica may run (free GPUs there: no eviction)
    training_nodes: frozenset[str] = frozenset()  # the training partition's nodes (its minimum holds)
    release: Callable[[Sequence[str]], None] | None = None  # scontrol release: a held replica may start
    signalled: set[str] = field(default_factory=set)
    evicted_for: set[str] = field(default_factory=set)  # replicas whose victims were signalled

    def __call__(self, replica: Job, jobs: Sequence[Job], now: datetime) -> Eviction | None:
        """Signal the gentlest victims for ``replica`` (pending, or held by its submission), unless some were
        already signalled; a held replica is pinned to the freed node (if any) and released."""
        from hpcserve.rebalance.victims import choose_eviction, lost_gpu_s

        held = replica.reason == HELD
        if held and self._fits_now(replica):
            self._release(replica)  # free GPUs: Slurm places it without preempting anyone
            return None
        if self._capped(jobs):
            if held:
                self._keep_off_shared(replica)
            return None
        shared = [j for j in jobs if self.shared_nodes.intersection(j.nodes)]
        eviction = None
        if not self._under_way(replica, shared, now):
            owned = [(j.id, j.user) for j in shared]
            marks = checkpoint_times(self.checkpoint_dir, owned) if self.checkpoint_dir else {}
            spare = self.policy.rebalance.spare_ending_within_s
            eviction = choose_eviction(shared, replica.gpus, marks, now, spare, self.policy)
            if eviction is not None and eviction.victims:
                self._evict(replica, eviction, [lost_gpu_s(v, marks, now) for v in eviction.victims], now)
        if held:
            if eviction is None:
                nodes = ",".join(sorted(self.shared_nodes))
                log.info("replica job %s: no gentle victim for %d GPUs on %s: released, Slurm's "
                         "preemption decides", replica.id, replica.gpus, nodes)  # fmt: skip
            self._release(replica)
        return eviction

    def _evict(self, replica: Job, eviction: Eviction, lost_s: list[float], now: datetime) -> None:
        """Pin the replica to the node, USR2 the victims, record what each loses."""
        victims = [j.id for j in eviction.victims]
        self.signalled.update(victims)
        self.evicted_for.add(replica.id)
        if self.pin is not None:  # Slurm's preemption then frees exactly this node for the replica
            self.pin(replica.id, [eviction.node])
        for victim in eviction.victims:
            self._send_usr2(victim)
        if self.store is not None:
            self.store.add_lost_work(
                [
                    self._lost(v, eviction.node, replica, s, now)
                    for v, s in zip(eviction.victims, lost_s, strict=True)
                ]
            )
        log.info("replica job %s: USR2 to %s on %s (lost %.2f GPU-h)", replica.id, ", ".join(victims),
                 eviction.node, eviction.lost_gpu_s / 3600)  # fmt: skip

    def _capped(self, jobs: Sequence[Job]) -> bool:
        from hpcserve.rebalance.victims import share_capped

        return share_capped(jobs, self.shared_nodes, self.inference_nodes, self.training_nodes, self.policy)

    def _keep_off_shared(self, replica: Job) -> None:
        """At the policy's cap: the replica may start on inference's own nodes only (no preemption), or stays
        held when inference has none."""
        own = sorted(self.inference_nodes - self.shared_nodes)
        if own and self.pin is not None:
            self.pin(replica.id, own)
            self._release(replica)
        log.info("replica job %s: inference is at the policy's cap (rebalance: max_inference_nodes / "
                 "min_training_nodes): %s", replica.id,
                 f"may start on {','.join(own)} only" if own else "held")  # fmt: skip

    def _fits_now(self, replica: Job) -> bool:
        """Some inference node has the replica's GPUs free (a one-node replica; ``nodes()`` is one read)."""
        if not self.inference_nodes:
            return False
        per_node = replica.gpus // max(replica.num_nodes, 1)
        return any(n.name in self.inference_nodes and n.gpus_free >= per_node for n in self.client.nodes())

    def _release(self, replica: Job) -> None:
        if self.release is not None:
            self.release([replica.id])

    def _send_usr2(self, victim: Job) -> None:
        """USR2 to the batch shell when it traps it (hpcserve's templates: it forwards the signal to the step
        and requeues), else to the job's steps (``ResumableTask`` under submitit), as the rebalancer does."""
        from hpcserve.errors import SlurmCommandError
        from hpcserve.rebalance.executor import traps_usr2

        signal = getattr(self.client, "signal", None)
        if signal is None or not hasattr(self.client, "batch_script"):  # cannot tell: the steps (Slurm's way)
            self.client.cancel([victim.id], signal="USR2")
            return
        try:
            batch = traps_usr2(self.client, str(victim.job_id))  # type: ignore[arg-type]
        except SlurmCommandError:
            batch = False  # Slurm did not answer: the steps, as before the batch shell could be asked
        signal([str(victim.job_id)], "USR2", batch=batch)

    def _under_way(self, replica: Job, shared: Sequence[Job], now: datetime) -> bool:
        """An eviction for this replica, or of a job still on a shared node, began within the victims'
        grace and a minute more: by this process, or (the store) by the service before a restart."""
        if replica.id in self.evicted_for or any(j.id in self.signalled for j in shared):
            return True
        if self.store is None:
            return False
        since = now - timedelta(seconds=self.grace_s + UNDER_WAY_MARGIN_S)
        ids = {j.id for j in shared}
        recent = [
            r for r in self.store.lost_work(since=since) if r.job_id in ids or r.replica_job_id == replica.id
        ]
        self.signalled.update(r.job_id for r in recent)
        return bool(recent)

    @staticmethod
    def _lost(victim: Job, node: str, replica: Job, lost_s: float, now: datetime) -> LostWork:
        from hpcserve.serving.tags import parse_replica_tag
        from hpcserve.store import LostWork

        tag = parse_replica_tag(replica.tag)
        deployment = tag[0] if tag else replica.name
        return LostWork(now, victim.id, victim.user, node, victim.gpus, lost_s, deployment, replica.id)
