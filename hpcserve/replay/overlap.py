"""Lending through Slurm's own preemption: overlapping partitions over every node, inference at the higher
``PriorityTier``, ``PreemptMode=REQUEUE`` with a ``GraceTime`` (the training class's ``grace_s``). No node
moves: a replica that has no GPUs preempts training, and training backfills every idle GPU.

Policies (``OverlapPolicy``; the replay carries them out: ``hpcserve.replay.engine``):
- ``slurm-preempt``, the baseline: what a Slurm admin configures without hpcserve. A pending replica takes
  a node of the inference-only nodes (none when both partitions span every node), else an idle node,
  else Slurm's own victims (``slurm_victims``): running training jobs in ascending priority, the
  multifactor age factor alone (older jobs rank higher, so the youngest submission goes first), or with
  ``youngest_first`` the most recently started first; jobs are taken in that order until one node is
  free, and the taken jobs on that node are signalled (SIGTERM), killed ``grace_s`` later and requeued,
  losing their work since the last periodic checkpoint.
- ``overlap-prewarm``, hpcserve's ``lending: overlap``: the same preemption, plus a replica floor from a
  pre-warm source (``hpcserve.replay.floor.RiseRate``: what runs now plus the rise the product's forecast
  expects, the ramp the last 5 minutes of arrivals show, a standing share of the forecast for bursty
  traffic), one
  ``horizon_s`` ahead (>= grace + engine start + two autoscaler ticks), so the eviction and the start
  happen before the burst; the floor is the source's rate over what one replica serves at
  ``floor_load`` (the autoscaler's scale-up utilisation, as the product's ``per_replica_capacity``).
  Victims are hpcserve's gentle choice (``gentle_victims``): the node whose jobs checkpointed most
  recently (the least GPU-seconds of work since their last checkpoint, then the fewest GPUs), never a
  node with a job that ends within the spare window (``spare_s``, the horizon: it frees its GPUs by
  itself before they are needed). The signal is the checkpoint signal, sent as the floor rises
  (forecast time minus the grace): the victim saves at once, exits after ``checkpoint_save_s`` and
  loses only that.
- ``prewarm-foresight``: the floor set from the true busiest 10 s over the horizon (the reference).
- ``lending-bound``: ``hpcserve.replay.compare.lending_bound`` (no start, grace or lost work).

Simplifications (all of them): replicas take whole nodes (the site's GPUs per node is one replica of
``gpus_per_replica`` = 8; no per-GPU packing of replicas beside training); Slurm's scheduling of a
pending replica is modelled by the replay's ``lend_interval_s`` tick (10 s, the autoscaler's), not by
sched/backfill cycles; a node freed of its victims goes to the replica at once (no epilog, no health
check); a node whose replicas are all gone returns to training at once; the inference partition's
higher tier means training never preempts replicas, and ``OverCommit``/suspend modes are not modelled.
The baseline's jobs do not checkpoint on SIGTERM (the issue's model of a stock job), hpcserve's do on
its signal: the lost GPU-hours compare those two, not two equally careful jobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from hpcserve.placement import natural_key
from hpcserve.replay.floor import FloorSource
from hpcserve.replay.policies import SplitDecision, SplitView
from hpcserve.replay.training import Run, TrainingSide
from hpcserve.serving.autoscaler import UP_UTILIZATION

VictimOrder = Literal["priority", "youngest", "gentle"]


@dataclass(slots=True)
class OverlapPolicy:
    """A lending policy over overlapping partitions (module docstring); ``decide`` moves no node."""

    name: str
    victims: VictimOrder = "priority"
    save_on_signal: bool = False  # victims checkpoint on the signal (hpcserve's signal), else SIGTERM
    prewarm: FloorSource | None = None  # the rate to pre-warm replicas for; None: none
    spare_s: float = 0.0  # gentle: a job ending within this is never picked
    floor_load: float = UP_UTILIZATION  # the floor's replicas run the pre-warm rate at most this full

    def decide(self, view: SplitView) -> SplitDecision:
        return SplitDecision()


def priority_order(runs: Sequence[Run], order: VictimOrder) -> list[Run]:
    """Slurm's preemption order: lowest priority first (the age factor: latest submission first), or
    the latest start first (``PreemptParameters=youngest_first``)."""
    if order == "youngest":
        return sorted(runs, key=lambda r: (-(r.start or 0.0), -r.job.id))
    return sorted(runs, key=lambda r: (-r.job.submit, -r.job.id))


def slurm_victims(training: TrainingSide, order: VictimOrder) -> tuple[str, tuple[int, ...]] | None:
    """Slurm's choice for a one-node replica: jobs are taken in priority order until one node is free;
    the node and the taken jobs on it (None when no node can be freed)."""
    freed = dict(training.free)
    runs = [r for r in training.running.values() if not r.killing]
    taken: set[int] = set()
    for run in priority_order(runs, order):
        taken.add(run.job.id)
        for node in run.nodes:
            if node not in freed:
                continue
            freed[node] += run.job.gpus_per_node
            if freed[node] >= training.gpus[node]:
                return node, tuple(sorted(j for j in training.on_node[node] if j in taken))
    return None


def gentle_victims(training: TrainingSide, now: float, spare_s: float) -> tuple[str, tuple[int, ...]] | None:
    """hpcserve's choice: the node whose jobs lose the least (GPU-seconds since their last checkpoint,
    then GPUs taken), skipping nodes with a job that ends within ``spare_s``."""
    best: tuple[tuple[float, int, tuple[object, ...]], str, tuple[int, ...]] | None = None
    for node in training.free:
        runs = [training.running[j] for j in training.on_node[node] if not training.running[j].killing]
        if not runs or any(run.ends_at() - now <= spare_s for run in runs):
            continue
        lost = sum(training.since_checkpoint(run, now) * run.job.gpus for run in runs)
        key = (lost, sum(run.job.gpus for run in runs), natural_key(node))
        if best is None or key < best[0]:
            best = (key, node, tuple(sorted(run.job.id for run in runs)))
    return None if best is None else (best[1], best[2])
