"""What the executor persists and decides without I/O: a plan's steps, its moves as JSON, the drain reason,
which jobs hold a node and how to signal them, and whether a stored step may run at all (managed pool,
the policy's node counts): a plan row may have been written by hand, so nothing in it is trusted.

A plan's steps run phase by phase (every node drained, then every node's jobs signalled, then waited for,
moved, resumed), so the grace periods of several nodes overlap instead of adding up.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hpcserve.hostlists import collect
from hpcserve.model.cluster import TAG_PREFIX, Job, JobState
from hpcserve.model.rebalance import NodeMove, RebalancePlan, Side
from hpcserve.rebalance.candidates import preemptible_now
from hpcserve.rebalance.split import Layout
from hpcserve.store.records import NewStep, Step

if TYPE_CHECKING:
    from hpcserve.config.policy import Policy, RebalanceRules

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


def preemptible(job: Job, src: Side, kinds: frozenset[str], policy: Policy | None) -> bool:
    """Whether a job Slurm shows on a node leaving ``src`` gets USR2: its hpcserve tag's kind is a
    preemptible class, or the policy says it may be preempted (``candidates.preemptible_now``). Never a
    stored list: the ``preempt`` ids a plan row carries are not read here."""
    return tag_kind(job.tag) in kinds or (policy is not None and preemptible_now(job, policy, src))


def refusal(layout: Layout, move: NodeMove, step: Step) -> str | None:
    """Why a stored step must not run on its node (None: it may): the node is outside the site's managed
    pool, or the step does not match its plan's move."""
    if not layout.managed(step.node):
        pool = collect(sorted(layout.start)) or "empty"
        return f"{step.node} is not in the site's managed pool ({pool}): hpcserve never touches it"
    if (move.node, move.src.value, move.dst.value) != (step.node, step.src, step.dst) or move.src is move.dst:
        return f"step {step.seq} ({step.node} {step.src}->{step.dst}) does not match its plan's move"
    return None


def bounds_refusal(
    layout: Layout, rules: RebalanceRules, partitions: Mapping[str, Sequence[str]], moves: Iterable[NodeMove]
) -> str | None:
    """Why the plan's moves not yet carried out would break the policy's node counts per side (None: they
    do not). Counts are whole sides (as the planner counts them); only a side the plan shrinks is held to
    its minimum and only one it grows to its maximum."""
    count = {side: len(partitions.get(layout.partition(side), ())) for side in Side}
    delta = dict.fromkeys(Side, 0)
    for move in moves:
        if move.node in partitions.get(layout.partition(move.src), ()) and move.node not in partitions.get(
            layout.partition(move.dst), ()
        ):
            delta[move.src] -= 1
            delta[move.dst] += 1
    for side in Side:
        after, (low, high), name = count[side] + delta[side], _limits(rules, side), side.value
        if delta[side] < 0 and after < low:
            return f"the plan leaves {name} {after} node(s), below the policy's min_{name}_nodes {low}"
        if delta[side] > 0 and high is not None and after > high:
            return f"the plan gives {name} {after} node(s), above the policy's max_{name}_nodes {high}"
    return None


def _limits(rules: RebalanceRules, side: Side) -> tuple[int, int | None]:
    if side is Side.TRAINING:
        return rules.min_training_nodes, rules.max_training_nodes
    return rules.min_inference_nodes, rules.max_inference_nodes


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
