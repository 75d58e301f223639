"""What the executor persists and decides without I/O: a plan's steps, its moves as JSON, the drain reason,
which jobs hold a node and how to signal them.

A plan's steps run phase by phase (every node drained, then every node's jobs signalled, then waited for,
moved, resumed), so the grace periods of several nodes overlap instead of adding up.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hpcserve.rebalance.types import NodeMove, RebalancePlan, Side
from hpcserve.slurm.models import TAG_PREFIX, Job, JobState
from hpcserve.store.records import NewStep, Step

PHASES = ("drain", "signal", "wait", "move", "resume")
DRAIN_PREFIX = "hpcserve: moving to "
UNFINISHED = ("pending", "running")
# A job holds its node while Slurm still runs, signals or cleans up any part of it.
_HOLDING = frozenset(
    {
        JobState.RUNNING, JobState.COMPLETING, JobState.CONFIGURING, JobState.SUSPENDED,
        JobState.SIGNALING, JobState.STAGE_OUT, JobState.STOPPED, JobState.RESIZING,
    }
)  # fmt: skip
_USR2_TRAP = re.compile(r"^\s*trap\s.*\b(SIG)?USR2\b", re.MULTILINE)


def plan_steps(plan: RebalancePlan) -> list[NewStep]:
    """Steps in execution order: one per node and phase, phase by phase."""
    return [
        NewStep(node=m.node, src=m.src.value, dst=m.dst.value, kind=kind)
        for kind in PHASES
        for m in plan.moves
    ]


def move_to_json(move: NodeMove) -> dict[str, Any]:
    return {"node": move.node, "src": move.src.value, "dst": move.dst.value, "reason": move.reason,
            "preempt": list(move.preempt), "grace_s": move.grace_s}  # fmt: skip


def move_from_json(data: Mapping[str, Any]) -> NodeMove:
    return NodeMove(
        node=str(data["node"]), src=Side(data["src"]), dst=Side(data["dst"]),
        reason=str(data.get("reason", "")), preempt=tuple(str(j) for j in data.get("preempt", ())),
        grace_s=int(data.get("grace_s", 0)),
    )  # fmt: skip


def plan_reason(plan: RebalancePlan) -> str:
    return "; ".join(plan.reasons) or "; ".join(m.reason for m in plan.moves) or "manual"


def drain_reason(dst: str, plan_id: int) -> str:
    return f"{DRAIN_PREFIX}{dst} (plan {plan_id})"


def drained_by_us(reason: str) -> bool:
    return reason.startswith(DRAIN_PREFIX)


def holding_jobs(jobs: Iterable[Job], node: str, shared: str | None) -> list[Job]:
    """Jobs that must leave ``node`` before it changes sides. Jobs of the shared partition may stay: the
    node stays in that partition, and either side's jobs preempt them there."""
    return [j for j in jobs if node in j.nodes and j.state in _HOLDING and j.partition != shared]


def tag_kind(tag: str | None) -> str | None:
    """``hpcserve:training:run1`` -> ``training``."""
    if not tag or not tag.startswith(TAG_PREFIX):
        return None
    return tag.removeprefix(TAG_PREFIX).split(":", 1)[0] or None


def preemptible(job: Job, move: NodeMove, kinds: frozenset[str]) -> bool:
    """The planner named the job, or its hpcserve tag says its job class is preemptible."""
    return job.id in move.preempt or str(job.job_id) in move.preempt or tag_kind(job.tag) in kinds


def signals_batch_shell(script: str) -> bool:
    """A batch script that traps USR2 handles it itself (hpcserve's templates forward it to the step and
    requeue); any other (submitit's) would die of it, so its steps get the signal instead."""
    return _USR2_TRAP.search(script) is not None


def first_open(steps: Sequence[Step]) -> Step | None:
    return next((s for s in steps if s.state != "done"), None)


def signalled(detail: str) -> list[str]:
    """The entries a signal step recorded: ``signalled: 12 batch, 13 steps`` -> ["12 batch", "13 steps"]."""
    _, _, listed = detail.partition("signalled:")
    return [item.strip() for item in listed.split(",") if item.strip()]
