"""The rebalancer's decisions, shared by the planner (pure), the executor, the CLI and the simulator.

Pure: no I/O imports (import-linter checks it). ``hpcserve.rebalance.types`` re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Side(StrEnum):
    TRAINING = "training"
    INFERENCE = "inference"

    @property
    def other(self) -> Side:
        return Side.INFERENCE if self is Side.TRAINING else Side.TRAINING


@dataclass(frozen=True, slots=True)
class NodeMove:
    """Move ``node`` from side ``src`` to side ``dst``. ``preempt`` lists the preemptible jobs on it that
    get their checkpoint signal and ``grace_s`` before the node is taken."""

    node: str
    src: Side
    dst: Side
    reason: str
    preempt: tuple[str, ...] = ()
    grace_s: int = 0


@dataclass(frozen=True, slots=True)
class Demand:
    """GPUs each side needs, now or forecast for a horizon."""

    training_gpus: float
    inference_gpus: float


@dataclass(frozen=True, slots=True)
class RebalancePlan:
    """The split the planner wants (nodes per side within the managed pool) and the moves to get there,
    with the reasons, in the order the executor carries them out."""

    target_inference_nodes: int
    moves: tuple[NodeMove, ...]
    reasons: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not self.moves
