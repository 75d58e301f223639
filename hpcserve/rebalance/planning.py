"""The planner hookup: what a planning cycle is given (``PlanInput``), the ``PlanFn`` shape, and the adapter
for hpcserve's planner (``hpcserve.rebalance.planner.plan_rebalance`` with ``forecast.forecast_demand``).

The planner's memory between cycles (hysteresis counters) is a typed ``PlannerState``, kept by the caller in
the database (``hpcserve.rebalance.control``, state "rebalance:planner") so that cron runs, one process each,
and a restarted or standby service count cycles too. Its cooldown memory is rebuilt from the stored plans
instead, so it holds even when the stored state is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from hpcserve.model.rebalance import RebalancePlan, Side

if TYPE_CHECKING:
    from hpcserve.config import Policy, SiteConfig
    from hpcserve.model.cluster import ClusterSnapshot
    from hpcserve.rebalance.planner import PlannerState
    from hpcserve.store import Plan, QueueSample

COUNTED = ("pending", "running", "done")  # plans whose moves count for the cooldown


@dataclass(frozen=True, slots=True)
class PlanInput:
    snapshot: ClusterSnapshot
    history: Sequence[QueueSample]  # oldest first
    site: SiteConfig
    policy: Policy
    recent_plans: Sequence[Plan]  # oldest first
    state: PlannerState  # what the planner returned last cycle (``PlannerState()`` at first)
    now: datetime


PlanFn = Callable[[PlanInput], tuple[RebalancePlan, "PlannerState"]]
"""A planning cycle: the plan, and the state to hand to the next cycle (kept only when applied)."""


def recent_moves(plans: Sequence[Plan]) -> list[tuple[str, Side, datetime]]:
    """(node, side, when) of the moves of plans that were not given up, oldest first."""
    return [(str(m["node"]), Side(m["dst"]), p.created_at) for p in sorted(plans, key=lambda p: p.id)
            if p.state in COUNTED for m in p.moves]  # fmt: skip


def planner_plan_fn(inp: PlanInput) -> tuple[RebalancePlan, PlannerState]:
    """hpcserve's planner: forecast each side's demand from the history, then plan within the policy."""
    from dataclasses import replace

    from hpcserve.rebalance.forecast import demand_history, forecast_demand
    from hpcserve.rebalance.planner import Moved, plan_rebalance

    names = inp.site.partition_names()
    history = demand_history(inp.history, names["training"], names["inference"])
    forecast = forecast_demand(history, inp.now, inp.policy.rebalance)
    moved = tuple(Moved(node, side, at) for node, side, at in recent_moves(inp.recent_plans))
    state = replace(inp.state, moved=moved)
    return plan_rebalance(inp.snapshot, history, forecast, inp.policy, inp.site, inp.now, state)
