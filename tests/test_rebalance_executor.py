"""The executor's step logic on a fake Slurm (tests/rebalance_fakes.py) and a real SQLite store: phases,
signals, grace, requeue, failures, crash-resume, the level-triggered split; plus the pure helpers, the
sampler's conversion and gap, the service guard, ``history`` and the Slurm argv builders."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest
from sqlalchemy.exc import OperationalError

from hpcserve.cli.history_cmd import parse_since
from hpcserve.cli.history_plot import plot_history
from hpcserve.config import load_policy, load_site_config
from hpcserve.errors import HpcserveError, SlurmCommandError, ValidationError
from hpcserve.rebalance.control import (
    STATE,
    Rebalancer,
    default_plan_fn,
    executor_settings,
    load_planner_state,
    manual_plan,
    parse_moves,
)
from hpcserve.rebalance.executor import Executor, ExecutorSettings, crash_point
from hpcserve.rebalance.planner import PlannerState
from hpcserve.rebalance.planning import PlanInput, planner_plan_fn
from hpcserve.rebalance.sampler import Sampler, queue_samples
from hpcserve.rebalance.split import Layout, desired_split, split_timeline, split_updates
from hpcserve.rebalance.steps import PHASES, bounds_refusal, plan_steps, signals_batch_shell
from hpcserve.rebalance.types import NodeMove, RebalancePlan, Side
from hpcserve.service.main import _guarded
from hpcserve.service.metrics import ServiceMetrics
from hpcserve.slurm.commands import signal_argv, update_nodes_argv, update_partition_argv
from hpcserve.slurm.models import Job, JobState
from hpcserve.store import HistoryStore, QueueSample
from hpcserve.store.records import NewStep
from tests.conftest import POLICY, REPO, SITE
from tests.rebalance_fakes import T0, Clock, FakeSlurm, job

LAYOUT = Layout("train", "infer", "all", {"node3": Side.TRAINING, "node4": Side.TRAINING,
                                          "node5": Side.INFERENCE, "node6": Side.INFERENCE})  # fmt: skip
TRAP = "#!/bin/bash\ntrap on_usr2 USR2\nsrun python train.py &\nwait\n"


class Crash(BaseException):
    """Stands in for SIGKILL: nothing after it runs, nothing catches it."""


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[HistoryStore]:
    """Steps are stamped by the store's clock: the same fake clock as the executor's."""
    with HistoryStore(f"sqlite:///{tmp_path}/h.db", clock=clock) as s:
        s.upgrade()
        yield s


@pytest.fixture
def slurm() -> FakeSlurm:
    return FakeSlurm()


def executor(slurm: FakeSlurm, store: HistoryStore, clock: Clock, holder: str | None = None) -> Executor:
    kinds = frozenset({"training"})
    options = ExecutorSettings(preemptible_kinds=kinds, settle_s=10, resume_timeout_s=5)
    return Executor(slurm, store, LAYOUT, options, clock=clock, sleep=clock.sleep, holder=holder)


def to_training(node: str = "node5", grace_s: int = 30, preempt: tuple[str, ...] = ()) -> RebalancePlan:
    return RebalancePlan(
        1, (NodeMove(node, Side.INFERENCE, Side.TRAINING, "test", preempt, grace_s),), ("t",)
    )


def replace_job(j: Job, **changes: object) -> Job:
    return msgspec.structs.replace(j, **changes)


def kinds_called(slurm: FakeSlurm) -> list[str]:
    return [c[0] for c in slurm.calls if c[0] not in ("squeue", "sinfo", "show-partition", "batch-script")]


# ------------------------------------------------------------------------------------------ pure helpers
def test_steps_run_phase_by_phase_so_grace_periods_overlap() -> None:
    plan = RebalancePlan(0, (NodeMove("node5", Side.INFERENCE, Side.TRAINING, "a"),
                             NodeMove("node6", Side.INFERENCE, Side.TRAINING, "b")), ())  # fmt: skip
    assert [(s.kind, s.node) for s in plan_steps(plan)] == [
        (k, n) for k in ("drain", "signal", "wait", "move", "resume") for n in ("node5", "node6")
    ]


def test_split_updates_touch_only_pool_nodes_and_add_before_removing() -> None:
    parts = {"train": ("node1", "node2", "node3", "node4"), "infer": ("node5", "node6", "node7", "node8"),
             "all": tuple(f"node{i}" for i in range(1, 9))}  # fmt: skip
    desired = desired_split(LAYOUT, [("node5", Side.TRAINING), ("node7", Side.TRAINING)])  # node7: not pool
    updates = split_updates(LAYOUT, parts, desired)
    assert list(updates) == ["train", "infer"]
    assert updates == {"train": ("node1", "node2", "node3", "node4", "node5"),
                       "infer": ("node6", "node7", "node8")}  # fmt: skip
    assert split_updates(LAYOUT, parts, desired, skip={"node5"}) == {}
    assert split_updates(LAYOUT, parts, dict(LAYOUT.start)) == {}


def test_only_batch_shells_that_trap_usr2_get_it() -> None:
    assert signals_batch_shell((REPO / "jobtemplates" / "train-torchrun.sbatch").read_text())
    assert signals_batch_shell("trap 'echo x' SIGUSR2 TERM\n") and signals_batch_shell(TRAP)
    assert not signals_batch_shell("#!/bin/bash\n# trap USR2 is not set here\nsrun python -m submitit\n")


def test_crash_point_hook_parses_and_refuses_typos() -> None:
    assert crash_point({}) is None and crash_point({"HPCSERVE_CRASH_AFTER": "move"}) == ("move", "started")
    assert crash_point({"HPCSERVE_CRASH_AFTER": "wait:acted"}) == ("wait", "acted")
    with pytest.raises(ValidationError, match=r"drain\|signal"):
        crash_point({"HPCSERVE_CRASH_AFTER": "moved"})


def test_manual_plans_and_move_arguments() -> None:
    parts = {"train": ("node1", "node2", "node3", "node4"), "infer": ("node5", "node6", "node7", "node8")}
    plan = manual_plan(LAYOUT, parts, parse_moves(["node5=training", "node3=training"]), 60)
    assert [(m.node, m.src, m.dst, m.grace_s) for m in plan.moves] == [
        ("node5", Side.INFERENCE, Side.TRAINING, 60)
    ]
    assert plan.target_inference_nodes == 1 and "node3 is already on the training side" in plan.reasons
    with pytest.raises(ValidationError, match="not in the managed pool"):
        manual_plan(LAYOUT, parts, {"node8": Side.TRAINING}, 0)
    with pytest.raises(ValidationError, match="NODE=training"):
        parse_moves(["node5:training"])


def test_argv_builders_keep_values_in_one_item_and_refuse_odd_names() -> None:
    assert update_partition_argv("train", ["node5", "node1", "node2"]) == [
        "scontrol", "update", "PartitionName=train", "Nodes=node[1-2,5]"
    ]  # fmt: skip
    assert update_nodes_argv(["node5"], "drain", "hpcserve: moving to training (plan 3)")[-1] == (
        "Reason=hpcserve: moving to training (plan 3)"
    )
    assert signal_argv(["12"], "USR2", batch=True) == [
        "scancel",
        "--verbose",
        "--signal=USR2",
        "--batch",
        "12",
    ]
    assert signal_argv(["12"], "USR2", batch=False) == ["scancel", "--verbose", "--signal=USR2", "12"]
    with pytest.raises(ValidationError):
        update_partition_argv("train Nodes=x", ["node1"])
    with pytest.raises(ValidationError):
        update_nodes_argv(["node5"], "DOWN")


# ------------------------------------------------------------------------------------------ executor
def test_a_move_drains_moves_and_resumes_in_that_order(
    slurm: FakeSlurm, store: HistoryStore, clock: Clock
) -> None:
    ex = executor(slurm, store, clock)
    plan_id = ex.submit(to_training())
    assert ex.run(plan_id) == "done"
    assert kinds_called(slurm) == ["drain", "update-partition", "update-partition", "resume"]
    assert slurm.parts["train"][-1] == "node5" and "node5" not in slurm.parts["infer"]
    assert "node5" in slurm.parts["all"] and "DRAIN" not in slurm.node_map["node5"].flags
    assert [s.state for s in store.steps(plan_id)] == ["done"] * 5
    assert store.steps(plan_id)[0].detail == "drained: hpcserve: moving to training (plan 1)"
    assert ex.desired()["node5"] is Side.TRAINING and ex.assert_split() == {}


def test_preemptible_jobs_get_usr2_then_the_rest_is_requeued_after_the_grace(
    slurm: FakeSlurm, store: HistoryStore, clock: Clock
) -> None:
    slurm.job_list = [job(11, "node5", "infer", "hpcserve:training:a"), job(12, "node5"), job(13, "node5"),
                      job(14, "node5", "all", "hpcserve:batch:x")]  # fmt: skip
    slurm.scripts["11"] = TRAP
    slurm.on_signal = lambda job_id, batch: slurm.leave(job_id) if job_id == "11" else None  # 11 checkpoints
    ex = executor(slurm, store, clock)
    plan_id = ex.submit(to_training(grace_s=30, preempt=("12",)))  # the stored list is never read
    assert ex.run(plan_id) == "done"

    signals = [c[1:] for c in slurm.calls if c[0] == "signal"]
    assert signals == [("11", "USR2", "batch")]  # 12 and 13 not preemptible, 14 shared
    assert [c[1] for c in slurm.calls if c[0] == "requeue"] == ["12", "13"]
    steps = {s.kind: s for s in store.steps(plan_id)}
    assert steps["signal"].detail == "signalled: 11 batch"
    assert steps["wait"].detail == "requeued 12, 13 after the 30s grace period"
    assert steps["move"].started_at is not None and steps["signal"].finished_at is not None
    assert (steps["move"].started_at - steps["signal"].finished_at).total_seconds() >= 30
    assert next(j for j in slurm.job_list if j.id == "14").state is JobState.RUNNING


# ------------------------------------------------------------------- stored plans are not trusted
def policy_executor(slurm: FakeSlurm, store: HistoryStore, clock: Clock, **rules: int) -> Executor:
    """The executor as the service builds it (control.executor_settings), with a policy's rebalance rules."""
    policy = load_policy(POLICY)
    policy = policy.model_copy(update={"rebalance": policy.rebalance.model_copy(update=rules)})
    settings = replace(executor_settings(policy), settle_s=10, resume_timeout_s=5)
    return Executor(slurm, store, LAYOUT, settings, clock=clock, sleep=clock.sleep)


def hand_written_plan(store: HistoryStore, node: str, src: Side, dst: Side, preempt: list[str]) -> int:
    """A plan row written straight into the database (as the service account could), not by submit()."""
    move = {"node": node, "src": src.value, "dst": dst.value, "reason": "by hand", "preempt": preempt,
            "grace_s": 5}  # fmt: skip
    steps = [NewStep(node=node, src=src.value, dst=dst.value, kind=kind) for kind in PHASES]
    return store.create_plan("by hand", [move], steps)


def test_a_hand_written_plan_for_an_unmanaged_node_is_refused_before_slurm_is_touched(
    slurm: FakeSlurm, store: HistoryStore, clock: Clock
) -> None:
    slurm.job_list = [job(21, "node1", "train", "hpcserve:training:a")]
    slurm.set_node("node1", flags=frozenset({"DRAIN"}), reason="hpcserve: moving to inference (plan 9)")
    plan_id = hand_written_plan(store, "node1", Side.TRAINING, Side.INFERENCE, ["21"])
    assert policy_executor(slurm, store, clock).run(plan_id) == "failed"
    assert kinds_called(slurm) == []  # no drain, signal, requeue, partition update, nor resume (of node1 too)
    first = store.steps(plan_id)[0]
    assert first.state == "failed" and "node1 is not in the site's managed pool (node[3-6])" in first.detail
    plan = store.plan(plan_id)
    assert slurm.parts["train"] == ("node1", "node2", "node3", "node4") and plan and plan.state == "failed"


def test_a_step_that_is_not_its_plans_move_is_refused(
    slurm: FakeSlurm, store: HistoryStore, clock: Clock
) -> None:
    move = {"node": "node5", "src": "inference", "dst": "training", "grace_s": 5}
    plan_id = store.create_plan("by hand", [move], [NewStep("node6", "inference", "training", "drain")])
    assert policy_executor(slurm, store, clock).run(plan_id) == "failed"
    assert "names node6, which plan 1 does not move" in store.steps(plan_id)[0].detail
    backwards = hand_written_plan(store, "node5", Side.INFERENCE, Side.INFERENCE, [])
    assert policy_executor(slurm, store, clock).run(backwards) == "failed"
    assert "does not match its plan's move" in store.steps(backwards)[0].detail
    assert kinds_called(slurm) == []


def test_the_policy_node_counts_are_rechecked_before_each_step(
    slurm: FakeSlurm, store: HistoryStore, clock: Clock
) -> None:
    plan_id = hand_written_plan(store, "node5", Side.INFERENCE, Side.TRAINING, [])
    assert policy_executor(slurm, store, clock, min_inference_nodes=4).run(plan_id) == "failed"
    detail = store.steps(plan_id)[0].detail
    assert "leaves inference 3 node(s), below the policy's min_inference_nodes 4" in detail
    assert kinds_called(slurm) == []
    ok = hand_written_plan(store, "node5", Side.INFERENCE, Side.TRAINING, [])
    assert policy_executor(slurm, store, clock, min_inference_nodes=3, max_training_nodes=5).run(ok) == "done"


def test_bounds_count_every_move_of_the_plan_not_yet_carried_out() -> None:
    parts = {"train": ("node1", "node2", "node3", "node4"), "infer": ("node5", "node6", "node7", "node8")}
    rules = load_policy(POLICY).rebalance.model_copy(update={"min_training_nodes": 3})
    two = [
        NodeMove("node3", Side.TRAINING, Side.INFERENCE, "a"),
        NodeMove("node4", Side.TRAINING, Side.INFERENCE, "b"),
    ]
    assert bounds_refusal(LAYOUT, rules, parts, two[:1]) is None
    assert "leaves training 2 node(s)" in (bounds_refusal(LAYOUT, rules, parts, two) or "")
    moved = {"train": ("node1", "node2", "node3"), "infer": ("node4", "node5", "node6", "node7", "node8")}
    assert "leaves training 2 node(s)" in (
        bounds_refusal(LAYOUT, rules, moved, two) or ""
    )  # node3 still to go
    two_left = rules.model_copy(update={"min_training_nodes": 2})
    assert bounds_refusal(LAYOUT, two_left, moved, two) is None  # node4 moved already: not counted twice


def test_jobs_to_signal_are_recomputed_from_slurm_never_the_stored_list(
    slurm: FakeSlurm, store: HistoryStore, clock: Clock
) -> None:
    hours, week = 5 * 3600, 7 * 86400  # over 4 hours: the training class only (not interactive)
    slurm.job_list = [
        replace_job(job(31, "node4", "train"), time_limit_s=hours),  # the training class: preemptible
        replace_job(job(32, "node4", "train"), time_limit_s=week),  # fits no class: not preemptible
        replace_job(job(33, "node6", "infer"), time_limit_s=hours),  # another node: listed, never signalled
    ]
    plan_id = hand_written_plan(store, "node4", Side.TRAINING, Side.INFERENCE, ["32", "33", "33_1"])
    assert policy_executor(slurm, store, clock).run(plan_id) == "done"
    assert [c[1] for c in slurm.calls if c[0] == "signal"] == ["31"]
    assert [c[1] for c in slurm.calls if c[0] == "requeue"] == ["31", "32"]  # left after the grace
    assert next(j for j in slurm.job_list if j.id == "33").state is JobState.RUNNING


def test_replicas_on_an_inference_node_going_back_get_usr2(
    slurm: FakeSlurm, store: HistoryStore, clock: Clock
) -> None:
    slurm.job_list = [job(41, "node6", "infer", "hpcserve:replica:llama:0"), job(42, "node6", "infer")]
    plan_id = hand_written_plan(store, "node6", Side.INFERENCE, Side.TRAINING, [])
    assert policy_executor(slurm, store, clock).run(plan_id) == "done"
    assert [c[1] for c in slurm.calls if c[0] == "signal"] == ["41"]


def test_a_killed_signal_step_never_signals_a_job_twice(
    slurm: FakeSlurm, store: HistoryStore, clock: Clock
) -> None:
    slurm.job_list = [
        job(11, "node5", tag="hpcserve:training:a"),
        job(12, "node5", tag="hpcserve:training:b"),
    ]
    slurm.fail_on["signal"] = Crash()  # killed while signalling job 11, after recording it
    plan_id = executor(slurm, store, clock).submit(to_training(grace_s=5))
    with pytest.raises(Crash):
        executor(slurm, store, clock).run(plan_id)
    assert store.steps(plan_id)[1].detail == "signalled: 11 steps" and store.plans()[0].state == "running"

    assert executor(slurm, store, clock).finish_unfinished() == [plan_id]
    assert [c[1] for c in slurm.calls if c[0] == "signal"] == ["12"]  # 11 was recorded: not again
    assert store.plans()[0].state == "done"


def test_a_restarted_wait_keeps_the_grace_period_it_started(
    slurm: FakeSlurm, store: HistoryStore, clock: Clock
) -> None:
    slurm.job_list = [job(12, "node5")]
    plan_id = executor(slurm, store, clock).submit(to_training(grace_s=60))
    slurm.fail_on["requeue"] = Crash()
    with pytest.raises(Crash):
        executor(slurm, store, clock).run(plan_id)
    requeue_due = clock.now
    assert executor(slurm, store, clock).finish_unfinished() == [plan_id]
    assert clock.now - requeue_due < timedelta(seconds=5)  # the resumed wait requeues at once


def test_jobs_that_cannot_be_requeued_fail_the_plan_and_the_node_is_resumed_where_it_is(
    slurm: FakeSlurm, store: HistoryStore, clock: Clock
) -> None:
    slurm.job_list = [job(12, "node5")]
    slurm.unrequeueable.add("12")
    ex = executor(slurm, store, clock)
    plan_id = ex.submit(to_training(grace_s=5))
    assert ex.run(plan_id) == "failed"
    wait = store.steps(plan_id)[2]
    assert wait.state == "failed" and "still run on node5" in wait.detail
    assert "node5" in slurm.parts["infer"] and "DRAIN" not in slurm.node_map["node5"].flags
    assert ex.desired()["node5"] is Side.INFERENCE


def test_slurm_down_leaves_the_plan_running_for_the_next_call(
    slurm: FakeSlurm, store: HistoryStore, clock: Clock
) -> None:
    ex = executor(slurm, store, clock)
    plan_id = ex.submit(to_training())
    slurm.fail_on["update-partition"] = SlurmCommandError(
        ["scontrol"], 1, "Unable to contact slurm controller"
    )
    with pytest.raises(SlurmCommandError):
        ex.run(plan_id)
    assert store.plans()[0].state == "running" and ex.repair_orphans() == []  # its plan is unfinished
    assert ex.finish_unfinished() == [plan_id] and store.plans()[0].state == "done"


def test_plans_record_the_process_that_ran_them_last_and_when_they_finished(
    slurm: FakeSlurm, store: HistoryStore, clock: Clock
) -> None:
    first = executor(slurm, store, clock, holder="host1:111")
    plan_id = first.submit(to_training())
    assert [(p.holder, p.finished_at) for p in store.plans()] == [("host1:111", None)]
    slurm.fail_on["update-partition"] = SlurmCommandError(
        ["scontrol"], 1, "Unable to contact slurm controller"
    )
    with pytest.raises(SlurmCommandError):
        first.run(plan_id)
    clock.sleep(600)
    assert executor(slurm, store, clock, holder="host2:222").finish_unfinished() == [plan_id]
    (plan,) = store.plans()
    assert (plan.state, plan.holder, plan.finished_at) == ("done", "host2:222", clock.now)
    assert plan.finished_at == store.steps(plan_id)[-1].finished_at

    site, policy = load_site_config(SITE), load_policy(POLICY)
    rebalancer = Rebalancer(slurm, store, site, policy, clock=clock, sleep=clock.sleep)
    assert rebalancer.round({"node6": Side.TRAINING}).state == "done"
    assert store.plans()[-1].holder == rebalancer.lease.holder


def test_a_node_an_admin_drained_is_left_alone(slurm: FakeSlurm, store: HistoryStore, clock: Clock) -> None:
    slurm.set_node("node5", flags=frozenset({"DRAIN"}), reason="bad DIMM")
    ex = executor(slurm, store, clock)
    assert ex.run(ex.submit(to_training())) == "failed"
    assert slurm.node_map["node5"].reason == "bad DIMM" and "resume" not in kinds_called(slurm)


def test_assert_split_reapplies_after_a_reset_but_not_for_nodes_still_moving(
    slurm: FakeSlurm, store: HistoryStore, clock: Clock
) -> None:
    ex = executor(slurm, store, clock)
    ex.run(ex.submit(to_training("node5")))
    saved = dict(slurm.parts)
    slurm.parts.update(
        {"train": ("node1", "node2", "node3", "node4"), "infer": ("node5", "node6", "node7", "node8")}
    )
    assert ex.assert_split() == {"train": saved["train"], "infer": saved["infer"]}
    slurm.parts.update(
        {"train": ("node1", "node2", "node3", "node4"), "infer": ("node5", "node6", "node7", "node8")}
    )
    ex.submit(to_training("node5"))  # an unfinished plan moves node5: its own steps will
    assert ex.assert_split() == {}


def test_the_desired_split_counts_moves_of_failed_plans_whose_move_step_is_done(
    slurm: FakeSlurm, store: HistoryStore, clock: Clock
) -> None:
    ex = executor(slurm, store, clock)
    plan_id = ex.submit(to_training("node6"))
    for seq in range(4):  # drain, signal, wait, move done; resume failed
        store.mark_step(plan_id, seq, "done")
    store.mark_step(plan_id, 4, "failed")
    store.set_plan_state(plan_id, "failed")
    other = ex.submit(to_training("node5"))
    store.set_plan_state(other, "aborted")  # nothing of it was done
    assert ex.desired() == {**LAYOUT.start, "node6": Side.TRAINING}


# ------------------------------------------------------------------------------------------ round, lease
def test_a_round_under_a_held_lock_does_nothing(slurm: FakeSlurm, store: HistoryStore, clock: Clock) -> None:
    site, policy = load_site_config(SITE), load_policy(POLICY)
    store.try_lock("rebalance", "someone-else", 60, clock())
    report = Rebalancer(slurm, store, site, policy, clock=clock).round({"node5": Side.TRAINING})
    assert report.locked and slurm.calls == []
    store.release_lock("rebalance", "someone-else")
    report = Rebalancer(slurm, store, site, policy, clock=clock, sleep=clock.sleep).round(
        {"node5": Side.TRAINING}
    )
    assert (
        report.state == "done" and report.moves_applied == 1 and store.try_lock("rebalance", "x", 1, clock())
    )


def test_the_planner_state_is_kept_in_the_database_only_when_applied(
    slurm: FakeSlurm, store: HistoryStore
) -> None:
    site, policy = load_site_config(SITE), load_policy(POLICY)
    seen: list[PlannerState] = []

    def planner(inp: PlanInput) -> tuple[RebalancePlan, PlannerState]:
        seen.append(inp.state)
        return RebalancePlan(2, (), ("hold",)), PlannerState(want=Side.INFERENCE, cycles=inp.state.cycles + 1)

    rebalancer = Rebalancer(slurm, store, site, policy, planner)
    assert rebalancer.plan()[0].reasons == ("hold",) and store.get_state(STATE) is None
    assert rebalancer.round().plan_id is None
    assert store.get_state(STATE) == {"moved": [], "want": "inference", "cycles": 1}
    rebalancer.round()  # a second process (cron, a restarted service) starts from the stored state
    assert [s.cycles for s in seen] == [0, 0, 1] and load_planner_state(store).cycles == 2
    store.put_state(STATE, {"moved": "not a list", "cycles": "x"})  # an older or broken encoding
    assert load_planner_state(store) == PlannerState()


# ------------------------------------------------------------------------------------------ sampler
def test_queue_samples_per_partition() -> None:
    slurm = FakeSlurm()
    slurm.set_node("node1", gpus_alloc=2, state="mixed")
    slurm.set_node("node5", flags=frozenset({"DRAIN"}))
    pending = msgspec.structs.replace(job(20, "", "train,infer", gpus=8), state=JobState.PENDING, nodes=())
    jobs = [job(10, "node1", "train", gpus=2), pending]
    rows = {r.partition: r for r in queue_samples(T0, slurm.nodes(), jobs)}
    assert rows["train"] == QueueSample(T0, "train", 1, 8, 2, 14, 16)
    assert rows["infer"] == QueueSample(T0, "infer", 1, 8, 0, 12, 16)  # node5 drained: not idle
    assert rows["all"] == QueueSample(T0, "all", 0, 0, 0, 26, 32)


def test_sampler_logs_a_gap_once_and_its_end(
    slurm: FakeSlurm, store: HistoryStore, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hpcserve.sampler")
    sampler = Sampler(slurm, store, clock=clock)
    assert sampler.tick() == 3
    slurm.down = True
    for _ in range(3):
        clock.sleep(30)
        assert sampler.tick() is None
    slurm.down = False
    clock.sleep(30)
    assert sampler.tick() == 3 and sampler.last_sample == clock.now
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("slurmctld unreachable since 2026-03-02T12:00:30+00:00")
    assert "(90 s gap)" in messages[1]


# ------------------------------------------------------------------------------------------ service
def test_the_guard_logs_a_lost_database_in_one_line_and_counts_it(caplog: pytest.LogCaptureFixture) -> None:
    metrics = ServiceMetrics()

    def lost() -> None:
        raise OperationalError("INSERT", {}, Exception("connection refused\nIs the server running?"))

    _guarded("sampler", lost, metrics)()
    _guarded("sampler", lambda: None, metrics)()
    line = next(r for r in caplog.records if "database unavailable" in r.getMessage())
    assert line.getMessage() == "sampler: database unavailable (connection refused); the next tick retries"
    assert line.exc_info is None
    value = metrics.registry.get_sample_value
    assert value("hpcserve_service_ticks_total", {"task": "sampler"}) == 2
    assert value("hpcserve_service_errors_total", {"task": "sampler"}) == 1


# ------------------------------------------------------------------------------------------ history
def test_since_and_split_timeline() -> None:
    assert parse_since("90m") == timedelta(minutes=90) and parse_since("2d") == timedelta(days=2)
    with pytest.raises(ValidationError, match="24h"):
        parse_since("yesterday")
    base = {"node1": Side.TRAINING, "node5": Side.INFERENCE, "node6": Side.INFERENCE}
    events = [(T0 + timedelta(hours=1), "node5", Side.TRAINING), (T0, "node6", Side.INFERENCE)]
    assert split_timeline(T0, base, events) == [(T0, 1, 2), (T0, 1, 2), (T0 + timedelta(hours=1), 2, 1)]
    later = T0 + timedelta(minutes=30)
    assert split_timeline(later, base, events) == [(later, 1, 2), (T0 + timedelta(hours=1), 2, 1)]


def test_plot_writes_a_png_and_says_what_to_install_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = [
        QueueSample(T0 + timedelta(minutes=i), p, 1, i, 2, 3, 16)
        for i in range(5)
        for p in ("train", "infer")
    ]
    path = tmp_path / "h.png"
    plot_history(path, samples, [(T0, 4, 4), (T0 + timedelta(minutes=2), 5, 3)], {"training": "train"})
    assert path.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(HpcserveError, match=r"pip install 'hpcserve\[plot\]'"):
        plot_history(path, samples, [], {})


@pytest.mark.postgres
def test_the_store_reconnects_after_postgres_drops_its_connections(clock: Clock) -> None:
    """What a PostgreSQL restart does to the pool: every open connection is cut. ``pool_pre_ping`` finds the
    dead ones, so the next tick's first write goes through (the server itself is shared: only this test's
    scratch database loses its connections)."""
    from sqlalchemy import create_engine

    from tests.store_helpers import PG_SERVER, scratch_database

    with scratch_database() as url, HistoryStore(url, clock=clock) as store:
        store.upgrade()
        store.add_queue_samples([QueueSample(T0, "train", 0, 0, 0, 16, 16)])
        admin = create_engine(f"{PG_SERVER}/test", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            cut = conn.exec_driver_sql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s",
                (url.rsplit("/", 1)[1],),
            ).scalar()
        admin.dispose()
        assert cut and cut >= 1
        store.add_queue_samples([QueueSample(T0 + timedelta(seconds=30), "train", 1, 4, 0, 16, 16)])
        assert [s.pending_jobs for s in store.queue_samples("train")] == [0, 1]


def test_the_planner_hookup_forecasts_from_the_samples_and_keeps_its_state(
    slurm: FakeSlurm, store: HistoryStore, clock: Clock
) -> None:
    site, policy = load_site_config(SITE), load_policy(POLICY)
    busy = [QueueSample(T0 - timedelta(minutes=m), p, 9, 40 if p == "infer" else 0, 16, 0, 16)
            for m in range(1, 60) for p in ("train", "infer")]  # fmt: skip
    store.add_queue_samples(busy)
    rebalancer = Rebalancer(slurm, store, site, policy, planner_plan_fn, clock=clock, sleep=clock.sleep)
    plan, after = rebalancer.plan()
    assert {(m.node, m.dst) for m in plan.moves} <= {("node3", Side.INFERENCE), ("node4", Side.INFERENCE)}
    assert plan.moves and after is not None and plan.reasons
    report = rebalancer.round()
    assert report.state == "done" and set(slurm.parts["infer"]) >= {m.node for m in plan.moves}
    assert store.get_state(STATE) is not None and planner_plan_fn is default_plan_fn()


def test_a_sampler_on_the_shared_view_dates_samples_by_the_read_and_stores_a_read_once(
    slurm: FakeSlurm, store: HistoryStore, clock: Clock
) -> None:
    read_at = clock.now - timedelta(seconds=8)  # the controller's calm read, 8 s old
    sampler = Sampler(slurm, store, clock=clock, timed=lambda: (read_at, slurm.jobs(), slurm.nodes()))
    assert sampler.tick() == 3 and sampler.last_sample == read_at
    assert {s.at for s in store.queue_samples(since=read_at)} == {read_at}
    clock.sleep(2)
    assert sampler.tick() == 0  # the same read again: nothing stored twice
    read_at = clock.now
    assert sampler.tick() == 3 and len(store.queue_samples(since=read_at - timedelta(seconds=11))) == 6
