"""What the service's /metrics shows beyond its counters, worked out from what its ticks already read: the
sampler's squeue and sinfo (queue depth, GPUs by state and their cost per partition) and a few rows of the
history database (replicas, finished plans, evictions, leases). No Slurm call, no database call here: the
functions and watchers take what was read and keep only what the next read is compared with.

- ``cluster_figures``: per partition the sampler's own figures (``queue_samples``), and the price of the
  GPUs allocated there (each node's allocated GPUs x the site's price for its GPU type); the cluster's
  total counts each node once (a node in two partitions is in both partitions' figures);
- ``deployment_figures``: replicas by state, desired replicas, and the GPUs and cost of each deployment's
  running replica jobs (a job counts only when the store names it as a replica: a user's job that copies a
  replica's comment is not charged to the deployment);
- ``ReplicaWatch``: replica jobs started and failed (a replica seen dead, or its job replaced without a
  spec change), counted from the second look on;
- ``PlanWatch``: node moves of plans that finished ``done`` after the first look, by direction;
- ``LostWorkWatch``: evictions (``lending: overlap``) and their lost GPU-hours stored after the first look.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from hpcserve.model.cluster import Job, JobState, Node
from hpcserve.rebalance.sampler import queue_samples
from hpcserve.store.records import (
    FINAL_PLAN_STATES,
    REPLICA_STATES,
    Deployment,
    LostWork,
    Plan,
    QueueSample,
    Replica,
)

Price = Callable[[str | None], float]
LENDING_KINDS = ("to_inference", "to_training", "eviction")


@dataclass(frozen=True, slots=True)
class ClusterFigures:
    samples: tuple[QueueSample, ...]
    cost_per_hour: dict[str, float]  # partition -> price of its allocated GPUs per hour
    cluster_cost_per_hour: float  # every node once
    job_cost: dict[str, tuple[int, float]]  # running job id -> (GPUs, price per hour)


def cluster_figures(at: datetime, jobs: Sequence[Job], nodes: Sequence[Node], price: Price) -> ClusterFigures:
    node_cost = {n.name: n.gpus_alloc * price(n.gpu_type) for n in nodes}
    per_partition: dict[str, float] = {}
    for node in nodes:
        for partition in node.partitions:
            per_partition[partition] = per_partition.get(partition, 0.0) + node_cost[node.name]
    types = {n.name: n.gpu_type for n in nodes}
    job_cost = {
        j.id: (j.gpus, j.gpus * price(types.get(j.nodes[0]) if j.nodes else None))
        for j in jobs
        if j.state is JobState.RUNNING and j.gpus
    }
    samples = tuple(queue_samples(at, nodes, jobs))
    costs = {s.partition: round(per_partition.get(s.partition, 0.0), 6) for s in samples}
    return ClusterFigures(samples, costs, round(sum(node_cost.values()), 6), job_cost)


@dataclass(frozen=True, slots=True)
class DeploymentFigures:
    replicas: dict[tuple[str, str], int]  # (deployment, state) -> replicas; every state, 0 included
    desired: dict[str, int]
    gpus: dict[str, int]  # GPUs of its running replica jobs
    cost_per_hour: dict[str, float]


def deployment_figures(
    deployments: Iterable[Deployment], replicas: Iterable[Replica], cluster: ClusterFigures | None
) -> DeploymentFigures:
    live = [d for d in deployments if not d.deleted]
    names = {d.name for d in live}
    counts = {(name, state): 0 for name in names for state in REPLICA_STATES}
    gpus, cost = dict.fromkeys(names, 0), dict.fromkeys(names, 0.0)
    jobs = cluster.job_cost if cluster is not None else {}
    for replica in replicas:
        if replica.deployment not in names:
            continue
        counts[(replica.deployment, replica.state)] = counts.get((replica.deployment, replica.state), 0) + 1
        held = jobs.get(replica.job_id or "")
        if held is not None:
            gpus[replica.deployment] += held[0]
            cost[replica.deployment] += held[1]
    return DeploymentFigures(counts, {d.name: d.desired_replicas for d in live}, gpus, cost)


@dataclass
class ReplicaWatch:
    """Replica jobs started and failed since the first look (that one only remembers what it saw): a start
    is a job id new at a replica's slot; a failure is a replica seen dead, or its job replaced by another
    under the same spec generation (it died between two looks)."""

    seen: dict[tuple[str, int], tuple[str | None, int | None]] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)  # job ids of listed replicas already counted as failed
    started: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    first: bool = True

    def look(self, replicas: Iterable[Replica]) -> None:
        now: dict[tuple[str, int], tuple[str | None, int | None]] = {}
        for r in replicas:
            now[(r.deployment, r.index)] = (r.job_id, r.generation)
            if not self.first:
                self._compare(r, *self.seen.get((r.deployment, r.index), (None, None)))
            if r.state == "dead" and r.job_id is not None and r.job_id not in self.failed:
                self.failed.add(r.job_id)
                if not self.first:
                    self.failures[r.deployment] += 1
        self.failed &= {job for job, _ in now.values() if job is not None}
        self.seen, self.first = now, False

    def _compare(self, replica: Replica, before_job: str | None, before_generation: int | None) -> None:
        if replica.job_id is None or replica.job_id == before_job:
            return
        self.started[replica.deployment] += 1
        if (
            before_job is not None
            and before_generation == replica.generation
            and before_job not in self.failed
        ):
            self.failures[replica.deployment] += 1


@dataclass
class PlanWatch:
    """Node moves of plans that reached ``done`` after the first look, by direction ("to_inference", ...).
    ``look`` takes the newest plans (their ids only grow, so one that left the list never comes back)."""

    counted: set[int] = field(default_factory=set)
    first: bool = True
    moves: Counter[str] = field(default_factory=Counter)

    def look(self, plans: Iterable[Plan]) -> None:
        listed = set()
        for plan in plans:
            listed.add(plan.id)
            if plan.id in self.counted or plan.state not in FINAL_PLAN_STATES:
                continue
            self.counted.add(plan.id)
            if plan.state == "done" and not self.first:
                for move in plan.moves:
                    self.moves[f"to_{move.get('dst', 'unknown')}"] += 1
        self.counted &= listed
        self.first = False


@dataclass
class LostWorkWatch:
    """Evictions stored after ``since`` (the first look's time), and the GPU-hours they lost."""

    since: datetime | None = None
    evictions: int = 0
    lost_gpu_h: float = 0.0

    def look(self, rows: Iterable[LostWork], now: datetime) -> None:
        if self.since is None:
            self.since = now
            return
        for row in rows:
            if row.at > self.since:
                self.evictions += 1
                self.lost_gpu_h += row.lost_gpu_h
                self.since = max(self.since, row.at)


@dataclass
class LeaseWatch:
    """Whether this process holds each lease; a lease it held at the last look and holds no more is lost."""

    held: dict[str, bool] = field(default_factory=dict)
    lost: Counter[str] = field(default_factory=Counter)

    def look(self, held: dict[str, bool]) -> None:
        for name, now in held.items():
            if self.held.get(name) and not now:
                self.lost[name] += 1
            self.lost.setdefault(name, 0)
        self.held = dict(held)
