"""The replay as Slurm would show it: a ``ClusterSnapshot`` of both sides, for decision code that takes one
(the rebalance planner). Built only when a policy asks (``SplitView.snapshot``).

- nodes: the training or inference partition by side (a moving node stays in its source partition,
  DRAIN-flagged, as the executor leaves it until its move step),
  plus the shared partition when the site has one; GPUs allocated to training jobs or replicas;
- jobs: training jobs (running or pending, in the training partition), and one job per replica, tagged
  ``hpcserve:replica:<deployment>:<index>`` as the launcher tags them (pending while it has no node).
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import TYPE_CHECKING

from hpcserve.rebalance.types import Side
from hpcserve.replay.scenario import AT0
from hpcserve.serving.tags import replica_tag
from hpcserve.slurm.models import ClusterSnapshot, Job, JobState, Node, Partition

if TYPE_CHECKING:
    from hpcserve.replay.engine import Replay
    from hpcserve.replay.scenario import Scenario
    from hpcserve.replay.training import Run


def build_snapshot(replay: Replay, now: float) -> ClusterSnapshot:
    site = replay.scenario.site
    names = {Side.TRAINING: site.partitions.training.name, Side.INFERENCE: site.partitions.inference.name}
    shared = (site.partitions.shared.name,) if site.partitions.shared else ()
    nodes = tuple(_node(replay, name, names, shared) for name in replay.scenario.nodes)
    jobs = _training_jobs(replay, names[Side.TRAINING], now) + _replica_jobs(replay, names[Side.INFERENCE])
    partitions = tuple(
        Partition(part, tuple(n.name for n in nodes if part in n.partitions),
                  total_gpus=sum(n.gpus_total for n in nodes if part in n.partitions))
        for part in (*names.values(), *shared)
    )  # fmt: skip
    return ClusterSnapshot(at=AT0 + timedelta(seconds=now), nodes=nodes, jobs=jobs, partitions=partitions)


def _node(replay: Replay, name: str, names: dict[Side, str], shared: tuple[str, ...]) -> Node:
    total = replay.scenario.gpus[name]
    side = replay.side.get(name)
    moving = replay.transit.get(name)
    if side is Side.TRAINING:
        used = total - replay.training.free.get(name, total)
    elif side is Side.INFERENCE:
        used = len(replay.inference.nodes.get(name, ())) * replay.scenario.serving.spec.gpus_per_replica
    else:
        used = sum(replay.training.runs[j].job.gpus_per_node for j in replay.training.on_node[name])
    state = "idle" if used == 0 else ("allocated" if used >= total else "mixed")
    member = side or (moving.other if moving else None)  # a moving node stays in its source, drained
    return Node(
        name, state, flags=frozenset({"DRAIN"}) if moving else frozenset(),
        partitions=((names[member],) if member else ()) + shared, gpus_total=total,
        gpus_alloc=min(used, total), switch=replay.scenario.topology.node_leaf.get(name),
    )  # fmt: skip


def _training_jobs(replay: Replay, partition: str, now: float) -> tuple[Job, ...]:
    s = replay.scenario
    running = [_job(s, run, partition, JobState.RUNNING, now) for run in replay.training.running.values()]
    queued = [replay.training.runs[j] for _, j in replay.training.queue]
    return tuple(running + [_job(s, run, partition, JobState.PENDING, now) for run in queued])


def _job(scenario: Scenario, run: Run, partition: str, state: JobState, now: float) -> Job:
    """A training job as squeue shows it. Its time limit is the run time it still needs (the exact
    estimates the backfill scheduler assumes), within the class's limit."""
    job = run.job
    waited = run.waited + (now - run.queued_since if run.start is None else 0.0)
    return Job(
        id=str(job.id), job_id=job.id, name=f"train-{job.id}", user="sim", account="sim", partition=partition,
        state=state, num_nodes=job.nodes, nodes=run.nodes, gpus=job.gpus, qos=scenario.training_qos,
        submit=AT0 + timedelta(seconds=job.submit),
        start=AT0 + timedelta(seconds=run.start) if run.start is not None else None,
        time_limit_s=min(math.ceil(run.remaining), int(scenario.max_run_s)), wait_s=round(waited, 1),
    )  # fmt: skip


def _replica_jobs(replay: Replay, partition: str) -> tuple[Job, ...]:
    """One job per replica the autoscaler keeps: running where it has a node, pending where it waits."""
    spec = replay.scenario.serving.spec
    return tuple(
        Job(
            id=f"r{r.index}",
            job_id=1_000_000 + r.index,
            name=spec.name,
            user="sim",
            account="sim",
            partition=partition,
            state=JobState.RUNNING if r.node else JobState.PENDING,
            num_nodes=1,
            nodes=(r.node,) if r.node else (),
            gpus=spec.gpus_per_replica,
            comment=replica_tag(spec.name, r.index),
            tag=replica_tag(spec.name, r.index),
        )
        for r in replay.inference.replicas.values()
    )
