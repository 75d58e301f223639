"""The rebalance executor: carries out a ``RebalancePlan`` through Slurm, one persisted step at a time.

Per node: drain -> signal its preemptible jobs -> wait (up to ``grace_s``, then ``scontrol requeue`` what is
left) -> move partition membership -> resume. Each step is recorded in the store before it acts
(``start_step``) and after (``mark_step``), and each is idempotent, so a process killed at any point
resumes the plan from its first step that is not done. Signals are sent at most once: a signal step
records a job before signalling it. A wait measures its grace period from the signal step's end, so a
restart does not lengthen it.

Nothing in a stored plan is trusted (a row may have been written by hand): before each step the node is
re-checked against the site's managed pool, the step against its plan's move, and the plan's remaining
moves against the policy's node counts per side; the jobs to signal are those Slurm shows on the node at
the signal step that the policy lets preempt (a ``preempt`` list in the row is never read).

Errors: Slurm or the database being unreachable leaves the plan running for the next call to resume; a
step that cannot succeed (a node drained by an admin, jobs that cannot be requeued) fails the plan, and
its drained nodes are resumed where they are ("orphan drain" repair: no node stays drained by hpcserve
without an unfinished plan).

Test hook: ``HPCSERVE_CRASH_AFTER=<kind>[:started|acted]`` (kind: drain, signal, wait, move, resume) makes
the process SIGKILL itself right after the first step of that kind is recorded as started (default), or
after it acted but before it is marked done. The crash-safety tests use it; never set it otherwise.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from hpcserve.errors import HpcserveError, SlurmCommandError, ValidationError
from hpcserve.hostlists import collect
from hpcserve.rebalance.split import Layout, desired_split, split_updates
from hpcserve.rebalance.steps import (
    PHASES,
    UNFINISHED,
    bounds_refusal,
    drain_reason,
    drained_by_us,
    holding_jobs,
    move_from_json,
    move_to_json,
    plan_reason,
    plan_steps,
    preemptible,
    refusal,
    signalled,
    signals_batch_shell,
)
from hpcserve.rebalance.types import NodeMove, RebalancePlan, Side
from hpcserve.slurm.models import Job, Node
from hpcserve.slurm.protocol import SlurmOperator, SlurmReader
from hpcserve.store import HistoryStore, NotFound, Plan, Step
from hpcserve.store.store import utc_now

if TYPE_CHECKING:
    from hpcserve.config.policy import Policy

log = logging.getLogger("hpcserve.rebalance")
CRASH_ENV = "HPCSERVE_CRASH_AFTER"
_UNREACHABLE = ("Unable to contact slurm controller", "Socket timed out", "Zero Bytes were transmitted",
                "Connection refused", "backup controller in standby")  # fmt: skip


class StepFailed(HpcserveError):
    """A step that cannot succeed: its plan fails and the plan's drained nodes are resumed where they are."""


def transient(exc: SlurmCommandError) -> bool:
    """Slurm did not answer (timeout, slurmctld down, no Slurm commands): worth retrying later."""
    return exc.returncode in (None, 127) or any(text in exc.stderr for text in _UNREACHABLE)


def traps_usr2(client: SlurmOperator, job_id: str) -> bool:
    """Whether the job's batch shell traps USR2 (hpcserve's templates: it forwards the signal to the step and
    requeues), so the signal goes to it; else its steps get it (``ResumableTask`` under submitit, or a job
    without a batch script). A transient Slurm error is raised: the caller retries."""
    try:
        return signals_batch_shell(client.batch_script(job_id))
    except SlurmCommandError as exc:
        if transient(exc):
            raise
        return False  # no batch script (an srun/salloc job): its steps get the signal


def crash_point(env: Mapping[str, str] = os.environ) -> tuple[str, str] | None:
    """The test hook's (step kind, "started"|"acted") from ``HPCSERVE_CRASH_AFTER``, or None."""
    value = env.get(CRASH_ENV, "").strip()
    if not value:
        return None
    kind, _, when = value.partition(":")
    if kind not in PHASES or when not in ("", "started", "acted"):
        raise ValidationError(f"{CRASH_ENV}={value!r}: use <{'|'.join(PHASES)}>[:started|acted]")
    return kind, when or "started"


@dataclass(frozen=True, slots=True)
class ExecutorSettings:
    """``preemptible_kinds``: job classes (hpcserve tag kinds) whose jobs get USR2; ``policy``: whose
    preemptible classes get USR2 too, and whose node counts each step re-checks; ``settle_s``: how long
    requeued jobs get to leave; ``resume_timeout_s``: how long to wait for a resumed node to be idle."""

    preemptible_kinds: frozenset[str] = frozenset()
    policy: Policy | None = None  # preemptible job classes and the node counts per side, re-checked per step
    poll_s: float = 1.0
    settle_s: float = 60.0
    resume_timeout_s: float = 60.0


class Executor:
    """Runs stored plans against Slurm. ``keepalive`` is called between steps and while waiting (the
    caller renews its lock there, and raises to stop). ``holder`` ("host:pid", the lease holder) is recorded
    on the plans this executor submits or runs, so an operator sees which process resumed a plan."""

    def __init__(
        self,
        client: SlurmOperator,
        store: HistoryStore,
        layout: Layout,
        settings: ExecutorSettings | None = None,
        *,
        clock: Callable[[], datetime] = utc_now,
        sleep: Callable[[float], None] = time.sleep,
        keepalive: Callable[[], None] = lambda: None,
        crash: tuple[str, str] | None = None,
        holder: str | None = None,
        reads: SlurmReader | None = None,  # the round's look for orphans (default: client, live)
    ) -> None:
        self._client, self._store, self._layout, self._holder = client, store, layout, holder
        self._reads: SlurmReader = reads or client
        self._settings = settings or ExecutorSettings()
        self._clock, self._sleep, self._keepalive, self._crash = clock, sleep, keepalive, crash

    # ------------------------------------------------------------------------------------ plans
    def submit(self, plan: RebalancePlan) -> int:
        """Store the plan and its steps (nothing runs yet); its id."""
        for move in plan.moves:
            if not self._layout.managed(move.node):
                raise ValidationError(
                    f"{move.node} is not in the site's managed pool: hpcserve never moves it"
                )
        moves = [move_to_json(m) for m in plan.moves]
        return self._store.create_plan(plan_reason(plan), moves, plan_steps(plan), holder=self._holder)

    def unfinished(self) -> list[Plan]:
        return sorted((p for state in UNFINISHED for p in self._store.plans(state)), key=lambda p: p.id)

    def finish_unfinished(self) -> list[int]:
        """Resume every plan a previous run left pending or running, oldest first; their ids."""
        plans = self.unfinished()
        for plan in plans:
            log.info("resuming rebalance plan %d (last run by %s)", plan.id, plan.holder or "unknown")
            self.run(plan.id)
        return [plan.id for plan in plans]

    def run(self, plan_id: int) -> str:
        """Carry the plan out from its first step that is not done; the plan's final state."""
        plan = self._store.plan(plan_id)
        if plan is None:
            raise NotFound(f"no rebalance plan {plan_id}")
        if plan.state not in UNFINISHED:
            return plan.state
        self._store.set_plan_state(plan_id, "running", holder=self._holder)
        steps = self._store.steps(plan_id)
        for index, step in enumerate(steps):
            if step.state == "done":
                continue
            try:
                move = self._guard(step, plan)
                steps[index] = self._step(step, move, steps)
            except (StepFailed, SlurmCommandError) as exc:
                if isinstance(exc, SlurmCommandError) and transient(exc):
                    raise
                return self._fail(step, exc)
        self._store.set_plan_state(plan_id, "done")
        log.info("rebalance plan %d done", plan_id)
        return "done"

    def _guard(self, step: Step, plan: Plan) -> NodeMove:
        """The step's move, re-checked against the site and the policy before the step acts: the plan row may
        have been written by hand, so a node outside the managed pool, a step that is not its plan's move, or
        moves that break the policy's node counts fail the plan before Slurm is touched."""
        try:
            moves = {str(m["node"]): move_from_json(m) for m in plan.moves}
        except (KeyError, TypeError, ValueError) as exc:
            raise StepFailed(f"plan {plan.id} has a move that does not parse ({exc!r}): refused") from exc
        move = moves.get(step.node)
        if move is None:
            raise StepFailed(
                f"step {step.seq} names {step.node}, which plan {plan.id} does not move: refused"
            )
        why = refusal(self._layout, move, step)
        if why is None and self._settings.policy is not None:
            rules = self._settings.policy.rebalance
            why = bounds_refusal(self._layout, rules, self._partitions(), moves.values())
        if why is not None:
            raise StepFailed(f"plan {plan.id} refused: {why}")
        return move

    def _fail(self, step: Step, exc: HpcserveError) -> str:
        log.error("rebalance plan %d failed at step %d (%s %s): %s", step.plan_id, step.seq, step.kind,
                  step.node, exc)  # fmt: skip
        self._store.mark_step(step.plan_id, step.seq, "failed", str(exc))
        self._store.set_plan_state(step.plan_id, "failed")
        self.repair_orphans()
        return "failed"

    def _step(self, step: Step, move: NodeMove, steps: Sequence[Step]) -> Step:
        self._keepalive()
        self._store.start_step(step.plan_id, step.seq)
        self._maybe_crash(step.kind, "started")
        detail = _ACTIONS[step.kind](self, step, move, steps)
        self._maybe_crash(step.kind, "acted")
        log.info("plan %d step %d %s %s: %s", step.plan_id, step.seq, step.kind, step.node, detail)
        return self._store.mark_step(step.plan_id, step.seq, "done", detail)

    def _maybe_crash(self, kind: str, when: str) -> None:
        if self._crash == (kind, when):
            log.warning("%s=%s:%s: killing this process (test hook)", CRASH_ENV, kind, when)
            os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------------------------------------------ steps
    def _drain(self, step: Step, move: NodeMove, steps: Sequence[Step]) -> str:
        node = self._node(step.node)
        if "DRAIN" in node.flags and not drained_by_us(node.reason):
            raise StepFailed(
                f"{node.name} is drained by someone else ({node.reason or 'no reason'}): left alone"
            )
        reason = drain_reason(step.dst, step.plan_id)
        self._client.drain([step.node], reason)
        return f"drained: {reason}"

    def _signal(self, step: Step, move: NodeMove, steps: Sequence[Step]) -> str:
        entries = signalled(step.detail)
        done = {entry.split()[0] for entry in entries}
        kinds = self._settings.preemptible_kinds
        jobs = holding_jobs(self._client.jobs(), step.node, self._layout.shared)
        policy = self._settings.policy  # recomputed from what Slurm shows on the node now, never the row
        for job in (j for j in jobs if preemptible(j, move.src, kinds, policy) and str(j.job_id) not in done):
            batch = traps_usr2(self._client, str(job.job_id))
            entries.append(f"{job.job_id} {'batch' if batch else 'steps'}")
            # recorded first: a crash between the two never signals a job twice
            self._store.mark_step(step.plan_id, step.seq, "todo", "signalled: " + ", ".join(entries))
            self._send_usr2(job, batch)
        return "signalled: " + ", ".join(entries) if entries else "no preemptible jobs"

    def _send_usr2(self, job: Job, batch: bool) -> None:
        try:
            self._client.signal([str(job.job_id)], "USR2", batch=batch)
        except SlurmCommandError as exc:
            if transient(exc):
                raise
            log.warning("USR2 to job %s failed (%s): it is requeued when the grace period ends", job.id, exc)

    def _wait(self, step: Step, move: NodeMove, steps: Sequence[Step]) -> str:
        signalled = next(s for s in steps if s.node == step.node and s.kind == "signal")
        start = signalled.finished_at or self._clock()
        left = self._holding_until(step.node, start + timedelta(seconds=move.grace_s))
        if not left:
            return f"free {max((self._clock() - start).total_seconds(), 0):.0f}s after the signal"
        ids = [str(j.job_id) for j in left]
        for job_id in ids:
            self._requeue(job_id)
        settle = timedelta(seconds=self._settings.settle_s)
        stuck = self._holding_until(step.node, self._clock() + settle)
        if stuck:
            stuck_ids = ", ".join(str(j.job_id) for j in stuck)
            raise StepFailed(f"jobs {stuck_ids} still run on {step.node} {settle.seconds}s after "
                             "`scontrol requeue` (not requeueable?)")  # fmt: skip
        return f"requeued {', '.join(ids)} after the {move.grace_s}s grace period"

    def _requeue(self, job_id: str) -> None:
        try:
            self._client.requeue([job_id])
        except SlurmCommandError as exc:
            if transient(exc):
                raise
            log.warning("scontrol requeue %s failed: %s", job_id, exc.reason)

    def _holding_until(self, node: str, deadline: datetime) -> list[Job]:
        """Poll until no job holds ``node`` or ``deadline`` passes; the jobs still holding it."""
        while True:
            left = holding_jobs(self._client.jobs(), node, self._layout.shared)
            if not left or self._clock() >= deadline:
                return left
            self._keepalive()
            self._sleep(self._settings.poll_s)

    def _move(self, step: Step, move: NodeMove, steps: Sequence[Step]) -> str:
        updates = split_updates(self._layout, self._partitions(), {step.node: Side(step.dst)})
        for name, nodes in updates.items():
            self._client.update_partition_nodes(name, nodes)
        if not updates:
            return f"already in {self._layout.partition(Side(step.dst))}"
        return " ".join(f"{name}={collect(nodes)}" for name, nodes in updates.items())

    def _resume(self, step: Step, move: NodeMove, steps: Sequence[Step]) -> str:
        node = self._node(step.node)
        if "DRAIN" in node.flags and not drained_by_us(node.reason):
            return f"left drained: someone else drained it ({node.reason or 'no reason'})"
        if "DRAIN" in node.flags:
            self._client.resume([step.node])
        end = self._clock() + timedelta(seconds=self._settings.resume_timeout_s)
        while not node.available and self._clock() < end:
            self._keepalive()
            self._sleep(self._settings.poll_s)
            node = self._node(step.node)
        where = self._layout.partition(Side(step.dst))
        if node.available:
            return f"{node.name} {node.display_state} in {where}"
        waited = self._settings.resume_timeout_s
        return f"resumed in {where}, but {node.name} is {node.display_state} after {waited:g}s"

    # ------------------------------------------------------------------------------------ level-triggered
    def desired(self) -> dict[str, Side]:
        """The split the carried-out moves give (the site's starting sides where nothing moved)."""
        return desired_split(self._layout, [(s.node, Side(s.dst)) for s in self._store.done_moves()])

    def assert_split(self) -> dict[str, tuple[str, ...]]:
        """Re-apply the desired split where Slurm's partitions differ (e.g. after ``scontrol reconfigure``),
        leaving nodes of unfinished plans to their plan; the partitions changed, with their new nodes."""
        busy = {str(m["node"]) for p in self.unfinished() for m in p.moves}
        updates = split_updates(self._layout, self._partitions(), self.desired(), skip=busy)
        for name, nodes in updates.items():
            log.warning("partition %s drifted from the desired split: setting Nodes=%s", name, collect(nodes))
            self._client.update_partition_nodes(name, nodes)
        return updates

    def repair_orphans(self) -> list[str]:
        """Resume managed nodes hpcserve drained that no unfinished plan is moving; their names."""
        busy = {str(m.get("node")) for p in self.unfinished() for m in p.moves}
        orphans = [n.name for n in self._reads.nodes() if "DRAIN" in n.flags and drained_by_us(n.reason)
                   and n.name not in busy and self._layout.managed(n.name)]  # fmt: skip
        for name in orphans:
            log.warning("%s is drained by hpcserve but no plan is moving it: resuming it", name)
            self._client.resume([name])
        return orphans

    # ------------------------------------------------------------------------------------ reads
    def _node(self, name: str) -> Node:
        found = next((n for n in self._client.nodes() if n.name == name), None)
        if found is None:
            raise StepFailed(f"Slurm does not know node {name} (fix: check the site's managed_pool)")
        return found

    def _partitions(self) -> dict[str, tuple[str, ...]]:
        return {p.name: p.nodes for p in self._client.partitions()}


_Action = Callable[[Executor, Step, NodeMove, Sequence[Step]], str]
_ACTIONS: dict[str, _Action] = {
    "drain": Executor._drain,
    "signal": Executor._signal,
    "wait": Executor._wait,
    "move": Executor._move,
    "resume": Executor._resume,
}
