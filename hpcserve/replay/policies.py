"""Split policies: how many nodes the inference side should have, decided every rebalance tick.

A ``SplitPolicy`` gets a ``SplitView`` of the replay (no clock, no I/O) and returns a ``SplitDecision``:
either a target count of inference nodes (the replay picks the nodes: ``hpcserve.replay.engine``), or the
moves to make (the rebalance planner's own ``NodeMove``s). Three kinds:
- ``StaticPolicy``: a fixed split, sized for the inference peak of the whole replay;
- reactive, predictive (and the extra planner-foresight): the rebalance planner, told the demand now,
  the forecast, or the true future demand (``hpcserve.replay.planned``);
- ``IdealSplit`` (the "oracle"): no planner: perfect foresight of the inference load, exactly the nodes
  it needs, moved without headroom, hysteresis or cooldown, and given back whether or not training
  queues. It moves nodes like any policy does (a target count the replay carries out, with the same
  move delay, drains, preemption grace and lost work, and replica start-up), so it is the reference the
  planner's policies are measured against. It knows what the service cannot: the load ahead, and, when
  it takes busy training nodes, which jobs lose the least work since their last checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from hpcserve.rebalance.types import Demand, NodeMove
from hpcserve.slurm.models import ClusterSnapshot


@dataclass(frozen=True, slots=True)
class SplitView:
    """The replay at one rebalance tick."""

    now: float  # seconds since the replay started
    at: datetime  # the same instant as a datetime (what the service's decision code takes)
    inference_nodes: int  # on the inference side, or moving there
    min_inference_nodes: int  # the inference side's nodes outside the pool
    max_inference_nodes: int  # ... plus the whole pool
    gpus_per_node: int
    demand: Demand  # GPUs each side wants now: running + pending jobs, replicas wanted by the autoscaler
    history: Sequence[tuple[datetime, Demand]]  # demand samples so far, oldest first
    snapshot: Callable[[], ClusterSnapshot]  # the replay as Slurm would show it (built on demand)

    def clamp(self, nodes: int) -> int:
        return min(max(nodes, self.min_inference_nodes), self.max_inference_nodes)


@dataclass(frozen=True, slots=True)
class SplitDecision:
    """A whole-side target for the inference side (the replay picks the nodes), or moves, or neither."""

    inference_nodes: int | None = None
    moves: tuple[NodeMove, ...] = ()
    reasons: tuple[str, ...] = ()


class SplitPolicy(Protocol):
    @property
    def name(self) -> str: ...

    def decide(self, view: SplitView) -> SplitDecision: ...


def hold(view: SplitView, target: int, reason: str) -> SplitDecision:
    """A decision that only names the target (the replay picks the nodes)."""
    return SplitDecision(inference_nodes=view.clamp(target), reasons=(reason,))


@dataclass(frozen=True, slots=True)
class StaticPolicy:
    """Always ``nodes`` inference nodes (clamped to what the pool allows)."""

    nodes: int
    name: str = "static"

    def decide(self, view: SplitView) -> SplitDecision:
        return hold(view, self.nodes, f"static split: {self.nodes} inference nodes")


@dataclass(frozen=True, slots=True)
class IdealSplit:
    """The oracle: inference gets what the true load will need (the replay knows the trace).
    ``need_nodes(start, end)`` is the nodes the autoscaler keeps for the peak rate in [start, end]. It
    grows to the need over [now - ``behind_s``, now + ``lead_s``] (``behind_s``: the autoscaler's
    scale-down window, whose replicas still hold nodes; ``lead_s``: what a node taken from training
    needs before its replica serves), and shrinks only to the need over [now - ``behind_s``, now +
    ``hold_s``], so a dip shorter than ``hold_s`` moves no node."""

    need_nodes: Callable[[float, float], int]
    lead_s: float
    behind_s: float
    hold_s: float
    name: str = "oracle"

    def decide(self, view: SplitView) -> SplitDecision:
        start = max(view.now - self.behind_s, 0.0)
        grow = self.need_nodes(start, view.now + self.lead_s)
        keep = self.need_nodes(start, view.now + max(self.hold_s, self.lead_s))
        target = grow if grow >= view.inference_nodes else min(view.inference_nodes, keep)
        return hold(view, target, f"{self.name}: {target} nodes cover the true load ahead")


def nodes_for_gpus(gpus: float, gpus_per_node: int) -> int:
    return math.ceil(gpus / gpus_per_node - 1e-9) if gpus > 0 else 0
