"""The planner hookup: what a planning cycle is given (``PlanInput``), the ``PlanFn`` shape, and the adapter
for hpcserve's planner (``hpcserve.rebalance.planner.plan_rebalance`` with ``forecast.forecast_demand``).

The planner's memory between cycles (hysteresis counters) is opaque JSON, kept by the caller in a state
file (``load_state``/``save_state``, written atomically) so that cron runs, one process each, count cycles
too. Its cooldown memory is rebuilt from the stored plans instead, so it holds even without the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcserve.errors import HpcserveError
from hpcserve.rebalance.types import RebalancePlan, Side

if TYPE_CHECKING:
    from hpcserve.config import Policy, SiteConfig
    from hpcserve.slurm.models import ClusterSnapshot
    from hpcserve.store import Plan, QueueSample

DEFAULT_STATE_FILE = "~/.local/state/hpcserve/rebalance-state.json"
COUNTED = ("pending", "running", "done")  # plans whose moves count for the cooldown


@dataclass(frozen=True, slots=True)
class PlanInput:
    snapshot: ClusterSnapshot
    history: Sequence[QueueSample]  # oldest first
    site: SiteConfig
    policy: Policy
    recent_plans: Sequence[Plan]  # oldest first
    state: Mapping[str, Any]  # what the planner returned last cycle ({} at first)
    now: datetime


PlanFn = Callable[[PlanInput], tuple[RebalancePlan, Mapping[str, Any]]]
"""A planning cycle: the plan, and the state to hand to the next cycle (kept only when applied)."""


def recent_moves(plans: Sequence[Plan]) -> list[tuple[str, Side, datetime]]:
    """(node, side, when) of the moves of plans that were not given up, oldest first."""
    return [(str(m["node"]), Side(m["dst"]), p.created_at) for p in sorted(plans, key=lambda p: p.id)
            if p.state in COUNTED for m in p.moves]  # fmt: skip


def planner_plan_fn(inp: PlanInput) -> tuple[RebalancePlan, Mapping[str, Any]]:
    """hpcserve's planner: forecast each side's demand from the history, then plan within the policy."""
    from dataclasses import replace

    from hpcserve.rebalance.forecast import demand_history, forecast_demand
    from hpcserve.rebalance.planner import Moved, PlannerState, plan_rebalance

    names = inp.site.partition_names()
    history = demand_history(inp.history, names["training"], names["inference"])
    forecast = forecast_demand(history, inp.now, inp.policy.rebalance)
    moved = tuple(Moved(node, side, at) for node, side, at in recent_moves(inp.recent_plans))
    state = replace(PlannerState.from_json(inp.state), moved=moved)
    plan, after = plan_rebalance(inp.snapshot, history, forecast, inp.policy, inp.site, inp.now, state)
    return plan, after.to_json()


def load_state(path: Path | None) -> dict[str, Any]:
    """The planner state saved last time; {} when there is none (or it is unreadable: start afresh)."""
    if path is None:
        return {}
    try:
        data = json.loads(path.expanduser().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_state(path: Path | None, state: Mapping[str, Any]) -> None:
    """Write the state atomically (a temporary file renamed over the old one)."""
    if path is None:
        return
    target = path.expanduser()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "w") as out:
            json.dump(dict(state), out)
        Path(tmp).replace(target)
    except OSError as exc:
        raise HpcserveError(f"cannot write the planner state {target}: {exc.strerror} "
                            "(fix: --state-file PATH in a writable folder)") from exc  # fmt: skip
