"""One rebalancing round, shared by ``hpcserve rebalance --apply`` (cron) and the service: under the database
lease "rebalance", finish what a crashed run left, resume orphan drains, re-assert the desired split, then
plan and carry out new moves.

The planner is a ``PlanFn`` (``hpcserve.rebalance.planning``): it reads no clock, database or Slurm; this
module loads what it needs, and keeps the planner's typed state between cycles in the database (the
service state "rebalance:planner", JSON through ``PlannerState.to_json``/``from_json``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from hpcserve.errors import HpcserveError, ValidationError
from hpcserve.model.rebalance import NodeMove, RebalancePlan, Side
from hpcserve.rebalance.executor import Executor, ExecutorSettings, crash_point
from hpcserve.rebalance.planner import PlannerState
from hpcserve.rebalance.planning import PlanFn, PlanInput
from hpcserve.rebalance.split import Layout, current_side
from hpcserve.slurm.shared_view import saw_change
from hpcserve.store.leases import holder_id, take_lease
from hpcserve.store.store import utc_now

if TYPE_CHECKING:
    from hpcserve.config import Policy, SiteConfig
    from hpcserve.slurm.protocol import SlurmOperator, SlurmReader
    from hpcserve.store import HistoryStore

log = logging.getLogger("hpcserve.rebalance")
LOCK = "rebalance"
STATE = "rebalance:planner"  # the planner's memory, in the service_state table
HISTORY = timedelta(days=7)
RECENT_PLANS = 50  # the planner's cooldown looks at the moves of these


class LockLost(HpcserveError):
    """Another process took the rebalance lease while this one still worked (it stops at once)."""


@dataclass(frozen=True, slots=True)
class RoundReport:
    """What one round did. ``locked``: another process held the lease, nothing was done."""

    locked: bool = False
    resumed: tuple[int, ...] = ()
    repaired: tuple[str, ...] = ()
    reasserted: dict[str, tuple[str, ...]] = field(default_factory=dict)
    plan: RebalancePlan | None = None
    plan_id: int | None = None
    state: str | None = None

    @property
    def moves_applied(self) -> int:
        return len(self.plan.moves) if self.plan is not None and self.state == "done" else 0


class Lease:
    """The database lease: taken for ``ttl_s``, renewed (at most every ``ttl_s / 4``) while work goes on."""

    def __init__(
        self,
        store: HistoryStore,
        ttl_s: float,
        clock: Callable[[], datetime] = utc_now,
        holder: str | None = None,
    ) -> None:
        self._store, self._ttl_s, self._clock = store, ttl_s, clock
        self.holder = holder or holder_id()
        self._renewed: datetime | None = None

    def take(self) -> bool:
        now = self._clock()
        held = take_lease(self._store, LOCK, self.holder, self._ttl_s, now)
        self._renewed = now if held else None
        return held

    def renew(self) -> None:
        now = self._clock()
        if self._renewed is not None and (now - self._renewed).total_seconds() < self._ttl_s / 4:
            return
        if not self.take():
            raise LockLost(f"another process took the {LOCK!r} lease: stopping (it resumes the plan)")

    def release(self) -> None:
        self._store.release_lock(LOCK, self.holder)
        self._renewed = None


def default_plan_fn() -> PlanFn | None:
    """The planner hpcserve ships (``hpcserve.rebalance.planner``), or None where it is missing."""
    import importlib.util

    if importlib.util.find_spec("hpcserve.rebalance.planner") is None:
        return None
    from hpcserve.rebalance.planning import planner_plan_fn

    return planner_plan_fn


def executor_settings(policy: Policy) -> ExecutorSettings:
    kinds = frozenset(name.value for name, rules in policy.classes.items() if rules.preemptible)
    return ExecutorSettings(preemptible_kinds=kinds, policy=policy)


def default_grace_s(policy: Policy) -> int:
    """The longest grace period of the preemptible job classes (what their jobs were promised)."""
    return max((c.grace_s for c in policy.classes.values() if c.preemptible), default=0)


class Rebalancer:
    """A planner, an executor and the lease, for one site."""

    def __init__(
        self, client: SlurmOperator, store: HistoryStore, site: SiteConfig, policy: Policy,
        plan_fn: PlanFn | None = None, *, ttl_s: float = 120.0,
        clock: Callable[[], datetime] = utc_now, sleep: Callable[[float], None] = time.sleep,
        holder: str | None = None,  # the lease holder (default "host:pid")
        view: SlurmReader | None = None,  # where the planner's snapshot comes from (default: client)
    ) -> None:  # fmt: skip
        self._client, self._store, self._site, self._policy = client, store, site, policy
        self._view: SlurmReader = view or client
        self._plan_fn, self._clock = plan_fn, clock
        self.layout = Layout.from_site(site)
        self.lease = Lease(store, ttl_s, clock, holder)
        self.executor = Executor(client, store, self.layout, executor_settings(policy), clock=clock,
                                 sleep=sleep, keepalive=self.lease.renew, crash=crash_point(),
                                 holder=self.lease.holder, reads=view)  # fmt: skip

    def plan(self) -> tuple[RebalancePlan, PlannerState | None]:
        """What the planner would do now, and its state for the next cycle (None: no planner). Reads
        Slurm, the history and the stored planner state; changes nothing."""
        if self._plan_fn is None:
            return RebalancePlan(0, (), ("no planner installed (hpcserve.rebalance.planner)",)), None
        now = self._clock()
        snapshot = self._view.snapshot()
        history = self._store.queue_samples(since=now - HISTORY)
        recent = self._store.plans(last=RECENT_PLANS)
        state = load_planner_state(self._store)
        return self._plan_fn(PlanInput(snapshot, history, self._site, self._policy, recent, state, now))

    def round(self, wanted: Mapping[str, Side] | None = None, grace_s: int | None = None) -> RoundReport:
        """One round under the lease; ``wanted`` (node -> side) replaces the planner with manual moves."""
        if not self.lease.take():
            return RoundReport(locked=True)
        try:
            return self._round(wanted, grace_s)
        finally:
            self.lease.release()

    def _round(self, wanted: Mapping[str, Side] | None, grace_s: int | None) -> RoundReport:
        ex = self.executor
        resumed, repaired, reasserted = ex.finish_unfinished(), ex.repair_orphans(), ex.assert_split()
        report = RoundReport(resumed=tuple(resumed), repaired=tuple(repaired), reasserted=reasserted)
        if resumed or repaired or reasserted:  # the executor wrote to Slurm: plan from what is there now
            saw_change(self._view)
        state: PlannerState | None = None
        if wanted:
            plan = self.manual_plan(wanted, grace_s)  # after the repairs: from where nodes are now
        else:
            plan, state = self.plan()
        if state is not None:
            self._store.put_state(STATE, state.to_json())  # the planner counts this cycle: it is carried out
        if plan.empty:
            return replace(report, plan=plan)
        plan_id = ex.submit(plan)
        try:
            return replace(report, plan=plan, plan_id=plan_id, state=ex.run(plan_id))
        finally:
            saw_change(self._view)  # the next round's planner sees the nodes where the plan left them

    def manual_plan(self, wanted: Mapping[str, Side], grace_s: int | None = None) -> RebalancePlan:
        partitions = {p.name: p.nodes for p in self._client.partitions()}
        grace = default_grace_s(self._policy) if grace_s is None else grace_s
        return manual_plan(self.layout, partitions, wanted, grace)


def load_planner_state(store: HistoryStore) -> PlannerState:
    """The planner state the last applied round stored; a fresh one when there is none, or when what is
    stored does not decode (an older format: the planner starts counting afresh, and says so)."""
    data = store.get_state(STATE)
    if data is None:
        return PlannerState()
    try:
        return PlannerState.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("stored planner state %r does not decode (%s): starting afresh", STATE, exc)
        return PlannerState()


def manual_plan(
    layout: Layout, partitions: Mapping[str, Sequence[str]], wanted: Mapping[str, Side], grace_s: int
) -> RebalancePlan:
    """A plan that moves each node in ``wanted`` to its side (nodes already there are left out)."""
    moves: list[NodeMove] = []
    reasons: list[str] = []
    for node, dst in wanted.items():
        if not layout.managed(node):
            pool = ", ".join(sorted(layout.start)) or "empty"
            raise ValidationError(f"{node} is not in the managed pool (fix: pick one of: {pool})")
        if current_side(layout, node, partitions) is dst:
            reasons.append(f"{node} is already on the {dst} side")
            continue
        moves.append(NodeMove(node, dst.other, dst, f"manual move to {dst}", grace_s=grace_s))
        reasons.append(f"manual: {node} to {dst}")
    sides = {n: wanted.get(n) or current_side(layout, n, partitions) or s for n, s in layout.start.items()}
    target = sum(1 for side in sides.values() if side is Side.INFERENCE)
    return RebalancePlan(target, tuple(moves), tuple(reasons))


def parse_moves(items: Sequence[str]) -> dict[str, Side]:
    """``node5=training`` items -> {node: side}."""
    wanted: dict[str, Side] = {}
    for item in items:
        node, eq, side = item.partition("=")
        if not eq or not node or side not in {s.value for s in Side}:
            raise ValidationError(
                f"--move {item!r}: expected NODE=training or NODE=inference (e.g. node5=training)"
            )
        wanted[node.strip()] = Side(side)
    return wanted
