"""The off tier made true: the controller's I/O around ``hpcserve.serving.warm_copies``.

Each tick, for each deployment:
- ``note``: the (node, warm copy) of each ready replica is remembered in the service state
  ``staged:<deployment>`` (a pool's: each member's copy, as its replica stages it). The nodes are the
  replica job's (squeue), else the host it announced; a replica whose phases say it staged nothing is
  skipped;
- ``tidy``: once the deployment is off with no replica left, one small job per node, submitted AS THE
  OWNER (``sbatch`` through ``OwnerRunner``, as the owner's replicas are, with the policy's inference class
  and no GPU), runs ``python -I -m hpcserve.serving.warm_cleanup FOLDER...`` on that node: it removes only
  folders holding hpcserve's staging manifest. The service itself never deletes a path the owner controls.
  A node whose job was submitted is forgotten; a failed submit is logged and tried again next tick.
- ``tidy_left``: a live pool whose replicas all run its members of now removes, the same way, the copies
  of members that left it (``warm_copies.plan_left``);
- ``tidy_gone``: a deployment removed with ``hpcserve rm`` (its row purged with its last replica: a pool's
  with its last member's) has its copies removed the same way, as the owner kept in its record, which
  outlives the row until every node's job is submitted. A record whose name another user's deployment
  took since is such a leftover too; the newcomer's copies are recorded once it is removed.

A later start stages again ("copied"). The job's log is ``unstage-<job id>.out`` in the owner's replica
folder of the deployment.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hpcserve.config.policy import JobClassName
from hpcserve.serving.pools import is_pool
from hpcserve.serving.tiers import Tier
from hpcserve.serving.warm_copies import (
    NONE,
    CopyOwner,
    Removal,
    Staged,
    plan_left,
    plan_removal,
    warm_copy,
)

if TYPE_CHECKING:
    from hpcserve.jobs.submit import Submitter
    from hpcserve.serving.launcher import ReplicaLauncher
    from hpcserve.serving.spec import DeploymentSpec
    from hpcserve.slurm.models import Job
    from hpcserve.store import Deployment, HistoryStore, Replica

log = logging.getLogger("hpcserve.serving")
STATE_PREFIX = "staged:"
CLEANUP_KIND = "unstage"  # the job's tag: hpcserve:unstage:<deployment>
CLEANUP_TIME_S = 300
CLEANUP_MODULE = "hpcserve.serving.warm_cleanup"


def cleanup_script(python: str, folders: Sequence[str]) -> str:
    """The cleanup job's batch script: the helper with each folder as one quoted argument."""
    argv = [python, "-I", "-m", CLEANUP_MODULE, *folders]
    return "#!/bin/sh\nexec " + " ".join(shlex.quote(a) for a in argv) + "\n"


def staged_by(replica: Replica, nodes: Sequence[str], specs: Sequence[DeploymentSpec], pool: bool,
              owner: str) -> list[tuple[str, str]]:  # fmt: skip
    """The (node, warm copy) pairs a ready replica of ``owner`` staged, from the specs it was launched
    with."""
    kind = ((replica.phases or {}).get("staging") or {}).get("kind")
    if replica.state != "ready" or (kind == NONE and not pool):
        return []
    return copies_on(nodes, specs, owner)


@dataclass
class Unstager:
    """The warm copies of every deployment, as the service remembers them (read once, then written
    through), and their removal by the owners' jobs."""

    store: HistoryStore
    launcher: ReplicaLauncher
    records: dict[str, Staged] | None = None
    tiers: dict[str, Tier] = field(default_factory=dict)  # this tick's tier of every deployment
    gone: set[str] = field(default_factory=set)  # records of removed deployments, still to clean up
    tidied: dict[str, tuple[str, Staged]] = field(default_factory=dict)  # tidy_left: pools found tidy
    noted: dict[str, tuple[Any, Staged]] = field(default_factory=dict)  # note: what the last look saw

    def begin(self, listed: Sequence[Deployment]) -> None:
        """A new tick: the records loaded on first use; each listed deployment's owner kept in its record;
        those of deployments gone marked for ``tidy_gone`` (forgotten when no owner was kept)."""
        if self.records is None:
            stored = self.store.states(STATE_PREFIX)
            self.records = {k.removeprefix(STATE_PREFIX): Staged.from_json(v) for k, v in stored.items()}
        self.tiers = {d.name: Tier.of(d.tier) for d in listed}
        owners = {d.name: copy_owner(d) for d in listed}
        self.gone = set()
        for name, staged in list(self.records.items()):
            owner = owners.get(name)
            if owner is not None and (staged.owner is None or staged.owner.user == owner.user):
                if staged.owner != owner:  # a record from before owners were kept, or a new partition
                    self._put(name, staged.owned_by(owner))
            elif staged.owner is not None:
                self.gone.add(name)
            else:
                log.warning("deployment %s is gone: its warm copies were recorded without their owner and "
                            "stay on disk: %s", name, staged.to_json()["nodes"])  # fmt: skip
                self._put(name, Staged())

    def note(self, deployment: Deployment, replicas: Sequence[Replica], jobs: Mapping[int, Job],
             members: Sequence[Mapping[str, Any]] | None) -> None:  # fmt: skip
        """Remember the warm copies of the deployment's ready replicas. A deployment whose ready replicas,
        specs and record are as the last tick left them is not looked at again (no spec checks and no
        stat of the cold tier each tick)."""
        if deployment.name in self.gone:
            return  # a leftover of another owner under this name: recorded once it is cleaned up
        ready = frozenset((r.index, r.job_id, tuple(_nodes(r, jobs))) for r in replicas if r.state == "ready")
        signature = (ready, json.dumps(deployment.spec if members is None else members, sort_keys=True,
                                       default=str))  # fmt: skip
        if self.noted.get(deployment.name) == (signature, self._record(deployment.name)):
            return
        specs = self._specs(deployment, members)
        seen = [pair for r in replicas
                for pair in staged_by(r, _nodes(r, jobs), specs, members is not None,
                                      deployment.owner)]  # fmt: skip
        old = self._record(deployment.name)
        if seen and not set(seen) <= old.pairs():
            self._put(deployment.name, old.with_seen(seen).owned_by(copy_owner(deployment)))
        self.noted[deployment.name] = (signature, self._record(deployment.name))

    def tidy(self, deployment: Deployment, tier: Tier, replicas: int, submitter: Submitter) -> None:
        """Once off with no replica left: one cleanup job per node as the owner; nodes done forgotten."""
        if deployment.name in self.gone:
            return
        staged = self._record(deployment.name).owned_by(copy_owner(deployment))
        removal = plan_removal(staged, tier, replicas, self._needed_elsewhere(deployment.name))
        self._remove(deployment.name, staged, removal, submitter, "off")

    def tidy_left(self, pool: Deployment, members: Sequence[Mapping[str, Any]], submitter: Submitter) -> None:
        """A live pool whose replicas all run ``members`` (the members of now): the copies of members that
        left it, removed as the owner; the copies ``members`` stage are kept. A pool whose members and
        record are as when it last had nothing left to remove is not looked at again (no spec checks and
        no stat of the cold tier each tick)."""
        staged = self._record(pool.name)
        if pool.name in self.gone or not staged.nodes:
            return
        signature = json.dumps(members, sort_keys=True, default=str)
        if self.tidied.get(pool.name) == (signature, staged):
            return
        specs = self._specs(pool, members)
        kept = frozenset(copies_on(list(staged.nodes), specs, pool.owner))
        removal = plan_left(staged, kept, self._needed_elsewhere(pool.name))
        self._remove(pool.name, staged.owned_by(copy_owner(pool)), removal, submitter, "a member left")
        after = self._record(pool.name)
        if after.pairs() <= kept:  # nothing left to remove (a failed submit is tried again next tick)
            self.tidied[pool.name] = (signature, after)

    def tidy_gone(self, submitter: Submitter) -> None:
        """The copies of deployments removed (no row, so no replica left): as if off, as the owner kept."""
        for name in sorted(self.gone):
            staged = self._record(name)
            removal = plan_removal(staged, Tier.OFF, 0, self._needed_elsewhere(name))
            self._remove(name, staged, removal, submitter, "removed")
            if name not in (self.records or {}):
                self.gone.discard(name)

    def _remove(self, name: str, staged: Staged, removal: Removal, submitter: Submitter, why: str) -> None:
        """Submit ``removal``'s jobs as ``staged``'s owner; the record keeps only the nodes not done."""
        owner = staged.owner
        if (not removal.remove and not removal.shared) or owner is None:
            return
        for node, path in removal.shared:
            log.info("deployment %s: warm copy %s on %s left to another deployment", name, path, node)
            staged = staged.without(node, [path])
        for node, folders in removal.remove.items():
            try:
                job_id = self.submit(submitter, name, owner, node, folders)
            except Exception as exc:  # the next tick tries again
                log.warning("deployment %s: cannot submit the warm cleanup on %s: %s", name, node, exc)
                continue
            log.info("deployment %s: %s: removing its warm copies on %s as %s (job %s): %s",
                     name, why, node, owner.user, job_id, ", ".join(folders))  # fmt: skip
            staged = staged.without(node, folders)
        self._put(name, staged)

    def submit(
        self, submitter: Submitter, name: str, owner: CopyOwner, node: str, folders: Sequence[str]
    ) -> str:
        """sbatch the cleanup of deployment ``name``'s ``folders`` on ``node`` as ``owner``; the job id."""
        from hpcserve.jobs.runas import OwnerRunner
        from hpcserve.jobs.spec import JobRequest
        from hpcserve.serving.launcher import replica_folder
        from hpcserve.slurm.cli_backend import CliSlurmClient

        launcher = self.launcher
        user = launcher.owner_of(owner.user)
        folder = replica_folder(launcher.replica_dir, user.user, name)
        request = JobRequest(JobClassName.INFERENCE, f"{name}-{CLEANUP_KIND}", user.user, owner.partition,
                             time_s=CLEANUP_TIME_S, account=owner.account,
                             output=str(folder / "unstage-%j.out"))  # fmt: skip
        job, _ = submitter.plan(request, kind=CLEANUP_KIND)
        args = [*dataclasses.replace(job, nodelist=(node,)).sbatch_args(), f"--chdir={folder}"]
        sbatch = CliSlurmClient(
            OwnerRunner(launcher.runner, launcher.method, user), timeout=launcher.timeout_s
        )
        return sbatch.submit(cleanup_script(launcher.python, folders), args)

    def _specs(
        self, deployment: Deployment, members: Sequence[Mapping[str, Any]] | None
    ) -> list[DeploymentSpec]:
        """The specs whose weights the replicas stage, with the site's storage applied (as the launcher
        hands them to the job): a pool's members', else the deployment's own."""
        from hpcserve.serving.site_storage import is_folder, members_with_site_storage

        if members is None and is_pool(deployment.spec):
            return []
        storage = getattr(self.launcher, "storage", None)  # a launcher without one stages as the spec says
        is_dir = getattr(self.launcher, "is_dir", is_folder)
        return members_with_site_storage([deployment.spec] if members is None else members, storage, is_dir)

    def _needed_elsewhere(self, name: str) -> frozenset[tuple[str, str]]:
        """The copies other live deployments, not off, staged (not those of deployments removed)."""
        records = self.records or {}
        return frozenset(pair for other, staged in records.items()
                         if other != name and other not in self.gone
                         and self.tiers.get(other, Tier.OFF) is not Tier.OFF
                         for pair in staged.pairs())  # fmt: skip

    def _record(self, name: str) -> Staged:
        return (self.records or {}).get(name, Staged())

    def _put(self, name: str, staged: Staged) -> None:
        if self.records is None:
            self.records = {}
        if staged.nodes:
            self.records[name] = staged
            self.store.put_state(f"{STATE_PREFIX}{name}", staged.to_json())
        elif self.records.pop(name, None) is not None:
            self.store.delete_state(f"{STATE_PREFIX}{name}")


def copy_owner(deployment: Deployment) -> CopyOwner:
    """Whom the deployment's cleanup jobs run as: its owner, with its account and partition."""
    partition = deployment.spec.get("partition")
    return CopyOwner(deployment.owner, deployment.account, partition if isinstance(partition, str) else None)


def copies_on(nodes: Sequence[str], specs: Sequence[DeploymentSpec], owner: str) -> list[tuple[str, str]]:
    """The (node, warm copy) pairs replicas of ``owner`` running ``specs`` stage on ``nodes``."""
    pairs = ((node, warm_copy(s.warm_tier, s.model, node, owner)) for node in nodes for s in specs)
    return [(node, path) for node, path in pairs if path is not None]


def _nodes(replica: Replica, jobs: Mapping[int, Job]) -> Sequence[str]:
    """The replica job's nodes (squeue), else the host it announced."""
    job = jobs.get(replica.index)
    if job is not None and job.nodes:
        return job.nodes
    return (replica.host,) if replica.host else ()
