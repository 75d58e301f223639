"""Which pool nodes move, once the planner knows how many (pure).

Lending training nodes to inference, in this order:
1. idle nodes before busy ones;
2. from the leaf switch least intact for training (the smallest share of its nodes on training), so
   training keeps the most complete leaves for its multi-node jobs; nodes without a leaf go first;
3. among busy nodes, those that would stay busy longest (their jobs' time limits), since waiting for
   them is least likely to pay off.
Jobs of the shared partition neither block a node nor are preempted by the move: the node stays in
that partition, where either side's jobs preempt them. A busy node is taken only if every job on it is
preemptible: it gets ``preempt`` (the job ids) and the
longest ``grace_s`` of their classes. A job's class is the one its partition, QoS, time limit and GPU
count fit; a job that fits no class, or a non-preemptible one, is never preempted: its node is waited for.
A preemptible job that ends within ``spare_ending_within_s`` is waited for too, rather than preempted.

Returning inference nodes to training: nodes without serving replicas first, then the fewest replicas,
then those that complete the most intact training leaf. Replica jobs on a returned node are listed in
``preempt`` with the inference class's ``grace_s`` (time to finish in-flight requests; the autoscaler
starts them again elsewhere), other jobs follow the rules above. A node that holds the last running
replica of a deployment is never taken.

A node that moved within ``cooldown_s`` does not move again.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from hpcserve.config.policy import JobClass, JobClassName
from hpcserve.model.cluster import ClusterSnapshot, Job, JobState
from hpcserve.model.rebalance import NodeMove, Side
from hpcserve.serving.tags import parse_replica_tag

if TYPE_CHECKING:
    from hpcserve.config.policy import Policy
    from hpcserve.config.site import SiteConfig

Key = tuple[float, float, float, str]


@dataclass(frozen=True, slots=True)
class Cycle:
    """What one planning cycle sees: every sided node's side (pool nodes as they stand, or the side they
    are moving to), the pool nodes it may count and move, and those in their cooldown."""

    snapshot: ClusterSnapshot
    site: SiteConfig
    policy: Policy
    now: datetime
    sides: Mapping[str, Side]
    usable: tuple[str, ...]
    cooling: Mapping[str, datetime] = field(default_factory=dict)

    def on(self, side: Side) -> tuple[str, ...]:
        """Usable pool nodes on ``side``."""
        return tuple(node for node in self.usable if self.sides.get(node) is side)

    @property
    def gpus_per_pool_node(self) -> int:
        """The fewest GPUs of any pool node (at least 1): node counts err towards more nodes."""
        pool = self.site.managed_pool.training + self.site.managed_pool.inference
        return max(min((self.site.gpus_of(node) for node in pool), default=1), 1)


@dataclass(frozen=True, slots=True)
class _Option:
    """A node that may move, what moving it costs, and how to say so."""

    node: str
    preempt: tuple[str, ...]
    grace_s: int
    deployments: tuple[str, ...]  # one entry per serving replica on it
    others: int  # jobs on it that are not serving replicas
    free_in_s: float  # when its jobs end by their time limits (inf: unknown)

    @property
    def note(self) -> str:
        if not self.preempt:
            return "idle"
        return f"preempts {', '.join(self.preempt)} with {self.grace_s}s grace"


def choose_moves(cycle: Cycle, dst: Side, count: int, need: str) -> tuple[list[NodeMove], list[str]]:
    """Up to ``count`` moves of usable pool nodes to ``dst``, and notes on the nodes that could not move
    (only when fewer than ``count`` could). ``need`` says why, for each move's reason."""
    src = dst.other
    options, blocked = _options(cycle, src)
    sides, serving = dict(cycle.sides), _serving(cycle.snapshot)
    chosen: list[_Option] = []
    leaves = _leaves(cycle)
    for _ in range(count):
        fit = [o for o in options if o not in chosen and not _last_replicas(o, serving)]
        if not fit:
            break
        best = min(fit, key=lambda o: _key(o, dst, sides, leaves))
        chosen.append(best)
        sides[best.node] = dst
        serving.subtract(best.deployments)
    moves = [NodeMove(o.node, src, dst, f"{need}: {o.note}", o.preempt, o.grace_s) for o in chosen]
    if len(moves) == count:
        return moves, []
    last = [
        f"{o.node}: holds the last running replica of {', '.join(_last_replicas(o, serving))}"
        for o in options
        if o not in chosen
    ]
    short = f"{dst.value} wants {count} node(s) this cycle; {len(moves)} can move now"
    return moves, [short, *blocked, *last]


def _options(cycle: Cycle, src: Side) -> tuple[list[_Option], list[str]]:
    options, blocked = [], []
    for node in cycle.on(src):
        option = _cooling(cycle, node) or _option(cycle, node, src)
        if isinstance(option, str):
            blocked.append(f"{node}: {option}")
        else:
            options.append(option)
    return options, blocked


def _cooling(cycle: Cycle, node: str) -> str | None:
    moved = cycle.cooling.get(node)
    if moved is None:
        return None
    ago = (cycle.now - moved).total_seconds()
    return f"moved {ago:.0f}s ago; cooldown {cycle.policy.rebalance.cooldown_s}s"


def _option(cycle: Cycle, node: str, src: Side) -> _Option | str:
    """The node as an option, or why it cannot move now."""
    shared = cycle.site.partitions.shared
    jobs = [j for j in _holding(cycle.snapshot, node) if not shared or j.partition != shared.name]
    replicas = [j for j in jobs if src is Side.INFERENCE and parse_replica_tag(j.tag)]
    others = [j for j in jobs if j not in replicas]
    graces = [cycle.policy.for_class(JobClassName.INFERENCE).grace_s] if replicas else []
    for job in others:
        grace = _preemptible_grace(cycle, job)
        if isinstance(grace, str):
            return grace
        graces.append(grace)
    running = [j for j in replicas if j.state is JobState.RUNNING]
    deployments = tuple(sorted(tag[0] for j in running if (tag := parse_replica_tag(j.tag))))
    free_in = max((_left_s(j, cycle.now) for j in jobs), default=0.0)
    preempt = tuple(j.id for j in sorted(jobs, key=lambda j: (j.job_id, j.id)))
    return _Option(node, preempt, max(graces, default=0), deployments, len(others), free_in)


def _preemptible_grace(cycle: Cycle, job: Job) -> int | str:
    """The grace to give ``job`` before it is preempted, or why it must not be."""
    classes = _classes_of(job, cycle.policy)
    if not classes or not all(c.preemptible for c in classes):
        names = "/".join(sorted(name.value for name, c in cycle.policy.classes.items() if c in classes))
        what = f"class {names}" if names else "no policy class fits it"
        return f"job {job.id} ({what}) is not preemptible; waiting for it to end"
    left = _left_s(job, cycle.now)
    spare = cycle.policy.rebalance.spare_ending_within_s
    if left <= spare:
        return f"job {job.id} ends within {left:.0f}s; waiting for it rather than preempting"
    return max(c.grace_s for c in classes)


def preemptible_now(job: Job, policy: Policy, src: Side) -> bool:
    """Whether ``job``, found on a node leaving ``src``, may be preempted: a serving replica leaving the
    inference side, or a job whose every fitting policy class is preemptible (the planner's own rule; the
    executor applies it again to the jobs Slurm shows on the node when it signals)."""
    if src is Side.INFERENCE and parse_replica_tag(job.tag):
        return True
    classes = _classes_of(job, policy)
    return bool(classes) and all(c.preemptible for c in classes)


def _classes_of(job: Job, policy: Policy) -> list[JobClass]:
    """The policy classes that could have submitted ``job``: partition, QoS, time limit and GPUs fit."""
    partitions = job.partition.split(",")
    return [
        rules
        for rules in policy.classes.values()
        if rules.partition in partitions
        and (not job.qos or rules.qos == job.qos)
        and job.time_limit_s is not None
        and job.time_limit_s <= rules.max_time_s
        and job.gpus <= rules.max_gpus_per_job
    ]


def _holding(snapshot: ClusterSnapshot, node: str) -> list[Job]:
    """Jobs on ``node`` now: not waiting, not over."""
    return [j for j in snapshot.jobs if node in j.nodes and not (j.state.is_pending or j.state.is_terminal)]


def _left_s(job: Job, now: datetime) -> float:
    """Seconds until ``job`` reaches its time limit (inf if unknown; 0 once it is completing)."""
    if job.state is JobState.COMPLETING:
        return 0.0
    if job.start is None or job.time_limit_s is None:
        return math.inf
    return max(job.time_limit_s - (now - job.start).total_seconds(), 0.0)


def _serving(snapshot: ClusterSnapshot) -> Counter[str]:
    """Running replicas per deployment, across the whole cluster."""
    tags = (parse_replica_tag(j.tag) for j in snapshot.jobs if j.state is JobState.RUNNING)
    return Counter(tag[0] for tag in tags if tag)


def _last_replicas(option: _Option, serving: Counter[str]) -> list[str]:
    """The deployments that would have no running replica left without this node."""
    on_node = Counter(option.deployments)
    return sorted(name for name, count in on_node.items() if serving[name] <= count)


def _leaves(cycle: Cycle) -> dict[str, str]:
    """Sided node -> its leaf switch (the site's map, else the snapshot's)."""
    leaves = {}
    for node in cycle.sides:
        seen = cycle.snapshot.node(node)
        leaf = cycle.site.leaf_of(node) or (seen.switch if seen else None)
        if leaf:
            leaves[node] = leaf
    return leaves


def _training_share(node: str, sides: Mapping[str, Side], leaves: Mapping[str, str]) -> float:
    """The share of the node's leaf that is on training (-1 for a node without a leaf)."""
    leaf = leaves.get(node)
    if leaf is None:
        return -1.0
    members = [n for n, name in leaves.items() if name == leaf]
    return sum(1 for n in members if sides.get(n) is Side.TRAINING) / len(members)


def _key(option: _Option, dst: Side, sides: Mapping[str, Side], leaves: Mapping[str, str]) -> Key:
    share = _training_share(option.node, sides, leaves)
    if dst is Side.INFERENCE:
        return (float(bool(option.preempt)), share, -option.free_in_s, option.node)
    return (float(len(option.deployments)), float(option.others), -share, option.node)
