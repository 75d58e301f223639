"""Gentle victims (``lending: overlap``): which training jobs give a replica its GPUs, chosen by hpcserve
rather than by Slurm's lowest-priority/youngest-first (pure).

A replica that needs ``gpus_needed`` GPUs on one node gets them from the shared node where evicting costs
least. On each node the candidates are ordered:
1. jobs that checkpointed within ``RECENT_CHECKPOINT_S`` (their marker is fresh: little to lose, and their
   checkpoint code is known to work) before the others;
2. then the least work since their last checkpoint: GPUs x seconds since it (since the job's start when no
   marker is seen: everything since then is lost);
3. then the youngest start (ties).
Candidates are taken in that order until the node's free GPUs plus theirs cover the need; the node whose
set loses the least GPU-seconds wins (ties: the node name). Never a candidate:
- a job that ends within ``spare_window_s`` (start + time limit): waiting for it costs nothing;
- a job no preemptible policy class fits (``candidates.preemptible_now``, the planner's own rule);
- a serving replica, or a job that is pending or over.
A multi-node job frees ``gpus / num_nodes`` GPUs on each of its nodes. No node that can be freed: no victims
(the replica waits, or Slurm's own preemption decides).

``share_capped``: under overload the policy's ``rebalance`` limits still hold in overlap mode. Inference takes
no further shared node when it would then hold more than ``max_inference_nodes`` (whole sides: its own nodes
plus the shared nodes replicas run on), or leave training fewer than ``min_training_nodes``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from hpcserve.model.cluster import Job, JobState
from hpcserve.model.rebalance import Side
from hpcserve.rebalance.candidates import preemptible_now
from hpcserve.serving.tags import parse_replica_tag

if TYPE_CHECKING:
    from hpcserve.config.policy import Policy

RECENT_CHECKPOINT_S = 300.0


@dataclass(frozen=True, slots=True)
class Eviction:
    """Where the replica goes, whom it evicts there, and the work they lose (GPU-seconds)."""

    node: str
    victims: tuple[Job, ...]
    lost_gpu_s: float


def lost_gpu_s(job: Job, checkpoints: Mapping[str, datetime], now: datetime) -> float:
    """GPUs x seconds since ``job``'s last checkpoint (its start when none is seen; 0 without either)."""
    since = checkpoints.get(job.id) or job.start
    if since is None:
        return 0.0
    return job.gpus * max((now - since).total_seconds(), 0.0)


def evictable(job: Job, policy: Policy, now: datetime, spare_window_s: float) -> bool:
    """Whether ``job`` may be chosen at all (see the module's rules)."""
    if job.state is not JobState.RUNNING or parse_replica_tag(job.tag) is not None:
        return False
    if job.start is not None and job.time_limit_s is not None:
        left = job.time_limit_s - (now - job.start).total_seconds()
        if left <= spare_window_s:
            return False
    return preemptible_now(job, policy, Side.TRAINING)


def choose_eviction(
    jobs: Iterable[Job],
    gpus_needed: int,
    checkpoints: Mapping[str, datetime],
    now: datetime,
    spare_window_s: float,
    policy: Policy,
    free_gpus: Mapping[str, int] | None = None,
) -> Eviction | None:
    """The cheapest node to free ``gpus_needed`` GPUs on, among the nodes ``jobs`` run on (and
    ``free_gpus``' nodes); None when no node can be freed."""
    free = dict(free_gpus or {})
    by_node: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        for node in job.nodes:
            by_node[node].append(job)
    options = [
        option
        for node in sorted(set(by_node) | set(free))
        if (option := _on_node(node, by_node[node], gpus_needed, free.get(node, 0), checkpoints, now,
                               spare_window_s, policy)) is not None
    ]  # fmt: skip
    return min(options, key=lambda e: (e.lost_gpu_s, len(e.victims), e.node), default=None)


def choose_victims(
    jobs_on_shared_nodes: Iterable[Job],
    gpus_needed: int,
    checkpoints: Mapping[str, datetime],
    now: datetime,
    spare_window_s: float,
    policy: Policy,
) -> list[Job]:
    """The jobs to evict for ``gpus_needed`` GPUs on one node (see ``choose_eviction``); [] if none can."""
    eviction = choose_eviction(jobs_on_shared_nodes, gpus_needed, checkpoints, now, spare_window_s, policy)
    return list(eviction.victims) if eviction else []


def _on_node(
    node: str,
    jobs: Sequence[Job],
    gpus_needed: int,
    free: int,
    checkpoints: Mapping[str, datetime],
    now: datetime,
    spare_window_s: float,
    policy: Policy,
) -> Eviction | None:
    taken: list[Job] = []
    have = free
    candidates = [j for j in jobs if evictable(j, policy, now, spare_window_s)]
    for job in sorted(candidates, key=lambda j: _order(j, checkpoints, now)):
        if have >= gpus_needed:
            break
        taken.append(job)
        have += job.gpus // max(job.num_nodes, 1)
    if have < gpus_needed:
        return None
    return Eviction(node, tuple(taken), sum(lost_gpu_s(j, checkpoints, now) for j in taken))


def _order(job: Job, checkpoints: Mapping[str, datetime], now: datetime) -> tuple[bool, float, float]:
    marker = checkpoints.get(job.id)
    recent = marker is not None and (now - marker).total_seconds() <= RECENT_CHECKPOINT_S
    start = -job.start.timestamp() if job.start is not None else 0.0
    return (not recent, lost_gpu_s(job, checkpoints, now), start)


def share_capped(
    jobs: Iterable[Job],
    shared_nodes: frozenset[str],
    inference_nodes: frozenset[str],
    training_nodes: frozenset[str],
    policy: Policy,
) -> bool:
    """Whether taking one more shared node for a replica breaks the policy's side limits (see the module)."""
    taken = {n for j in jobs if parse_replica_tag(j.tag) is not None for n in j.nodes if n in shared_nodes}
    inference_side = len(inference_nodes - shared_nodes) + len(taken) + 1
    training_side = len(training_nodes) - len(taken) - 1
    rules = policy.rebalance
    over = rules.max_inference_nodes is not None and inference_side > rules.max_inference_nodes
    return over or (bool(training_nodes) and training_side < rules.min_training_nodes)
