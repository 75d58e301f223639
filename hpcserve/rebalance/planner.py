"""The rebalance planner: how many of the managed pool's nodes inference should have, and which to move.

``plan_rebalance(snapshot, history, forecast, policy, site, now, state)`` is pure: no clock, no I/O. The
caller keeps the returned ``PlannerState`` for the next cycle, but only if it carries the plan out (a dry
run throws it away). Nodes outside the site's managed pool are never moved.

The split (``policy.rebalance``; counts are whole sides, the nodes that never move included):
- inference gets ceil((D x (1 + headroom) - GPUs of its fixed nodes) / GPUs per pool node) pool nodes,
  D = the larger of the forecast peak over the horizon and what its jobs hold or wait for now. It grows
  to that at once (inference comes first: its users wait on requests, training's on a queue);
- it gives nodes back only what it did not need within ``release_window_s`` either (``history``), and
  only as many as training's backlog fills: pending + running GPUs (the larger of now and the forecast)
  beyond training's capacity. Spare nodes with no backlog to take them stay where they are;
- then the min/max node counts of both sides (an upper bound wins over a lower one that contradicts it);
- a change waits until it was wanted ``hysteresis_cycles`` cycles in a row, unless it is at least
  ``hysteresis_nodes`` nodes or a bound is broken; demand that hovers at a boundary never moves a node.
  At most ``max_moves_per_cycle`` moves a cycle; the rest follows on the next cycles without waiting.
- a node that moved stays put for ``cooldown_s``, and counts on its new side meanwhile (the executor may
  still be draining it), so the next cycle does not move a second node for the same need.

Which nodes (``candidates``): idle ones first; training keeps its most complete leaf switches; jobs that
end soon are waited for; a non-preemptible job is never preempted; the last serving replica of a
deployment is never taken.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from hpcserve.model.cluster import ClusterSnapshot, Job
from hpcserve.model.rebalance import Demand, RebalancePlan, Side
from hpcserve.rebalance.candidates import Cycle, choose_moves
from hpcserve.rebalance.forecast import DemandHistory, recent_peak

if TYPE_CHECKING:
    from hpcserve.config.policy import Policy, RebalanceRules
    from hpcserve.config.site import SiteConfig

EPSILON = 1e-9  # 4.0 x 1.2 GPUs must not round up to a fifth node
NOT_DEMAND = ("JobHeld", "Dependency", "BeginTime")  # pending reasons that no node would cure


@dataclass(frozen=True, slots=True)
class Moved:
    """A node the planner moved, to which side, and when."""

    node: str
    dst: Side
    at: datetime


@dataclass(frozen=True, slots=True)
class PlannerState:
    """What ``plan_rebalance`` remembers between cycles (start with ``PlannerState()``)."""

    moved: tuple[Moved, ...] = ()  # moves within the cooldown, oldest first
    want: Side | None = None  # the side that wanted pool nodes last cycle
    cycles: int = 0  # for how many cycles in a row it did

    def to_json(self) -> dict[str, Any]:
        """The state as JSON-ready values (for a caller that runs once per process, like cron)."""
        moved = [{"node": m.node, "dst": m.dst.value, "at": m.at.isoformat()} for m in self.moved]
        return {"moved": moved, "want": self.want.value if self.want else None, "cycles": self.cycles}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PlannerState:
        moved = tuple(
            Moved(m["node"], Side(m["dst"]), datetime.fromisoformat(m["at"])) for m in data.get("moved", ())
        )
        want = data.get("want")
        return cls(moved, Side(want) if want else None, int(data.get("cycles", 0)))


@dataclass(frozen=True, slots=True)
class _Split:
    """The target number of usable pool nodes on inference, the bounds on it, and why."""

    current: int
    target: int
    low: int
    high: int
    why: str


def demand_now(snapshot: ClusterSnapshot, site: SiteConfig) -> Demand:
    """GPUs each side's jobs hold or wait for (held and dependent jobs excluded): the sample to record in
    the history, and the floor under the forecast."""
    names = site.partition_names()
    return Demand(
        training_gpus=float(_side_gpus(snapshot.jobs, names["training"])),
        inference_gpus=float(_side_gpus(snapshot.jobs, names["inference"])),
    )


def plan_rebalance(
    snapshot: ClusterSnapshot,
    history: DemandHistory,
    forecast: Demand,
    policy: Policy,
    site: SiteConfig,
    now: datetime,
    state: PlannerState,
) -> tuple[RebalancePlan, PlannerState]:
    """The plan for this cycle and the state to pass to the next one."""
    rules = policy.rebalance
    state = replace(state, moved=tuple(m for m in state.moved if _age(m.at, now) < rules.cooldown_s))
    cycle, skipped = _cycle(snapshot, site, policy, state, now)
    split = _split(cycle, history, forecast, rules)
    reasons = [*skipped, split.why]
    diff = split.target - split.current
    if diff == 0:
        reasons.append(f"hold: inference has its target of {split.target} pool node(s)")
        return RebalancePlan(split.target, (), tuple(reasons)), replace(state, want=None, cycles=0)
    dst = Side.INFERENCE if diff > 0 else Side.TRAINING
    cycles = state.cycles + 1 if state.want is dst else 1
    forced = not split.low <= split.current <= split.high
    if forced or abs(diff) >= rules.hysteresis_nodes or cycles >= rules.hysteresis_cycles:
        return _move(cycle, split, dst, reasons, replace(state, want=dst, cycles=cycles))
    reasons.append(
        f"hold: {dst.value} wants {abs(diff)} more pool node(s), for {cycles} of "
        f"{rules.hysteresis_cycles} cycles (or {rules.hysteresis_nodes}+ nodes at once)"
    )
    return RebalancePlan(split.target, (), tuple(reasons)), replace(state, want=dst, cycles=cycles)


def _move(
    cycle: Cycle, split: _Split, dst: Side, reasons: list[str], state: PlannerState
) -> tuple[RebalancePlan, PlannerState]:
    """Moves towards the target, at most ``max_moves_per_cycle``; once moving, the next cycles go on
    without waiting out the hysteresis again."""
    rules = cycle.policy.rebalance
    wanted = abs(split.target - split.current)
    count = min(wanted, rules.max_moves_per_cycle)
    need = f"inference should have {split.target} of {len(cycle.usable)} pool nodes, has {split.current}"
    moves, notes = choose_moves(cycle, dst, count, need)
    reasons += notes
    if count < wanted:
        reasons.append(f"at most {rules.max_moves_per_cycle} moves per cycle; the rest follows")
    moved = state.moved + tuple(Moved(m.node, m.dst, cycle.now) for m in moves)
    after = replace(state, moved=moved, cycles=max(state.cycles, rules.hysteresis_cycles))
    return RebalancePlan(split.target, tuple(moves), tuple(reasons)), after


def _cycle(
    snapshot: ClusterSnapshot, site: SiteConfig, policy: Policy, state: PlannerState, now: datetime
) -> tuple[Cycle, list[str]]:
    """Every sided node's side, and the pool nodes this cycle may count and move."""
    moving = {m.node: m for m in state.moved}
    sides = _fixed_sides(site)
    usable, skipped = [], []
    for node in sorted(_pool(site)):
        side, problem = _pool_side(snapshot, site, node, moving.get(node))
        if side is not None:
            sides[node] = side
        if problem:
            skipped.append(f"{node}: {problem}; left alone")
        else:
            usable.append(node)
    cooling = {node: m.at for node, m in moving.items()}
    return Cycle(snapshot, site, policy, now, sides, tuple(usable), cooling), skipped


def _pool(site: SiteConfig) -> tuple[str, ...]:
    return site.managed_pool.training + site.managed_pool.inference


def _fixed_sides(site: SiteConfig) -> dict[str, Side]:
    pool = set(_pool(site))
    parts = site.partitions
    sides = {node: Side.TRAINING for node in parts.training.nodes if node not in pool}
    sides.update({node: Side.INFERENCE for node in parts.inference.nodes if node not in pool})
    return sides


def _pool_side(
    snapshot: ClusterSnapshot, site: SiteConfig, node: str, moving: Moved | None
) -> tuple[Side | None, str]:
    """A pool node's side (the one it is moving to, while it moves) and why it is left alone, if it is."""
    seen = snapshot.node(node)
    if seen is None:
        return (moving.dst if moving else None), "not in the snapshot"
    if moving is not None:
        return moving.dst, ""
    names = site.partition_names()
    member = {side for side in Side if names[side.value] in seen.partitions}
    if len(member) != 1:
        where = "both partitions" if member else "neither partition"
        return None, f"in {where} ({names['training']}, {names['inference']})"
    side = member.pop()
    if not seen.available:
        return side, f"unavailable ({seen.display_state}{': ' + seen.reason if seen.reason else ''})"
    return side, ""


@dataclass(frozen=True, slots=True)
class _Need:
    """What each side asks of the pool this cycle, in pool nodes, from the demand figures."""

    now: Demand  # what the jobs hold or wait for now
    recent: Demand  # the most within the release window
    grow: int  # pool nodes inference needs for the larger of now and the forecast
    keep: int  # ... and for the most it needed within the release window
    backlog: float  # GPUs training wants beyond its capacity
    wanted: int  # pool nodes that backlog fills


def _split(cycle: Cycle, history: DemandHistory, forecast: Demand, rules: RebalanceRules) -> _Split:
    need = _need(cycle, history, forecast, rules)
    current, usable = len(cycle.on(Side.INFERENCE)), len(cycle.usable)
    if need.grow > current:
        desired = need.grow
    elif need.keep < current:
        desired = current - min(current - need.keep, need.wanted)
    else:
        desired = current
    low, high = _bounds(cycle, rules)
    target = min(max(min(desired, usable), low), high)
    why = (
        f"target: {target} of {usable} usable pool nodes on inference (now {current}); inference "
        f"{need.now.inference_gpus:g} GPUs now, forecast peak {forecast.inference_gpus:g} over "
        f"{rules.horizon_s}s, {need.recent.inference_gpus:g} in the last {rules.release_window_s}s "
        f"(+{rules.headroom:.0%} headroom: {need.grow} pool node(s)); training backlog "
        f"{max(need.backlog, 0):g} GPUs ({need.wanted} node(s))"
    )
    if desired > usable:
        why += f"; capped at the {usable} usable pool nodes"
    if target != min(desired, usable):
        why += f"; bounded to {low}..{high} by the min/max node counts"
    return _Split(current, target, low, high, why)


def _need(cycle: Cycle, history: DemandHistory, forecast: Demand, rules: RebalanceRules) -> _Need:
    now = demand_now(cycle.snapshot, cycle.site)
    recent = recent_peak(history, cycle.now, rules.release_window_s)
    grow = max(forecast.inference_gpus, now.inference_gpus)
    backlog = max(forecast.training_gpus, now.training_gpus) - _capacity(cycle, Side.TRAINING)
    return _Need(
        now=now,
        recent=recent,
        grow=_inference_nodes(cycle, grow, rules),
        keep=_inference_nodes(cycle, max(grow, recent.inference_gpus), rules),
        backlog=backlog,
        wanted=_nodes_for(cycle, backlog),
    )


def _nodes_for(cycle: Cycle, gpus: float) -> int:
    """Pool nodes that hold ``gpus`` (0 for none or fewer)."""
    return max(math.ceil(gpus / cycle.gpus_per_pool_node - EPSILON), 0)


def _inference_nodes(cycle: Cycle, gpus: float, rules: RebalanceRules) -> int:
    """Pool nodes inference needs for ``gpus`` plus headroom, beyond what its fixed nodes give."""
    return _nodes_for(cycle, gpus * (1 + rules.headroom) - _capacity(cycle, Side.INFERENCE, fixed_only=True))


def _capacity(cycle: Cycle, side: Side, fixed_only: bool = False) -> int:
    """GPUs of the side's available fixed nodes, plus (unless ``fixed_only``) its usable pool nodes."""
    pool = set(_pool(cycle.site))
    fixed = [n for n, s in cycle.sides.items() if s is side and n not in pool and _available(cycle, n)]
    nodes = fixed if fixed_only else [*fixed, *cycle.on(side)]
    return sum(cycle.site.gpus_of(node) for node in nodes)


def _available(cycle: Cycle, node: str) -> bool:
    seen = cycle.snapshot.node(node)
    return seen is not None and seen.available


def _bounds(cycle: Cycle, rules: RebalanceRules) -> tuple[int, int]:
    """The fewest and most usable pool nodes inference may have under the min/max node counts."""
    usable = set(cycle.usable)
    fixed = {side: sum(1 for n, s in cycle.sides.items() if s is side and n not in usable) for side in Side}
    size = len(usable)
    low = max(rules.min_inference_nodes - fixed[Side.INFERENCE], 0)
    high = size - max(rules.min_training_nodes - fixed[Side.TRAINING], 0)
    if rules.max_training_nodes is not None:
        low = max(low, size - max(rules.max_training_nodes - fixed[Side.TRAINING], 0))
    if rules.max_inference_nodes is not None:
        high = min(high, rules.max_inference_nodes - fixed[Side.INFERENCE])
    high = min(max(high, 0), size)
    return min(low, high), high


def _side_gpus(jobs: tuple[Job, ...], partition: str) -> int:
    return sum(job.gpus for job in jobs if partition in job.partition.split(",") and _counts(job))


def _counts(job: Job) -> bool:
    if job.state.is_terminal:
        return False
    return not (job.state.is_pending and job.reason.startswith(NOT_DEMAND))


def _age(at: datetime, now: datetime) -> float:
    return (now - at).total_seconds()
