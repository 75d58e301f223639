"""The rebalance planner: each rule on its own, cycles with carried state, and properties over random
clusters (site_configs/minicluster.yaml: pool node[3-4] training, node[5-6] inference;
site_configs/example-onprem.yaml: pool gpu[033-040] training, gpu[041-048] inference)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcserve.config import SiteConfig, load_policy, load_site_config
from hpcserve.config.policy import Policy, RebalanceRules
from hpcserve.rebalance.forecast import DemandHistory
from hpcserve.rebalance.planner import Moved, PlannerState, demand_now, plan_rebalance
from hpcserve.rebalance.types import Demand, NodeMove, RebalancePlan, Side
from hpcserve.serving.tags import replica_tag
from hpcserve.slurm.models import ClusterSnapshot, Job, JobState, Node

REPO = Path(__file__).resolve().parent.parent
MINI = load_site_config(REPO / "site_configs" / "minicluster.yaml")
ONPREM = load_site_config(REPO / "site_configs" / "example-onprem.yaml")
POLICY = load_policy(REPO / "policies" / "default.yaml")
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
TRAIN, INFER = Side.TRAINING, Side.INFERENCE
HOUR = 3600

# Three leaves of 8-GPU nodes: training t[1-8] over leafA (t1-4) and leafB (t5-8), inference i[1-2].
LEAFY = SiteConfig.model_validate(
    {
        "name": "leafy",
        "cluster": "leafy",
        "nodes": [{"names": "t[1-8]", "gpus": 8}, {"names": "i[1-2]", "gpus": 8}],
        "partitions": {
            "training": {"name": "train", "nodes": "t[1-8]"},
            "inference": {"name": "infer", "nodes": "i[1-2]"},
        },
        "managed_pool": {"training": "t[3-4,7-8]"},
        "fabrics": {"ib": {"kind": "infiniband", "hcas": ["mlx5_0"]}},
        "switches": {
            "leafA": {"nodes": "t[1-4]", "fabric": "ib"},
            "leafB": {"nodes": "t[5-8]", "fabric": "ib"},
            "leafC": {"nodes": "i[1-2]", "fabric": "ib"},
        },
        "storage": {"cold": {"path": "/shared/models"}},
    }
)


def rules(**values: Any) -> Policy:
    """The default policy with some ``rebalance`` fields changed (validated)."""
    data = POLICY.model_dump(mode="json")
    return Policy.model_validate({**data, "rebalance": {**data["rebalance"], **values}})


EAGER = rules(hysteresis_cycles=1)  # acts on the first cycle that wants a change


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def job(
    job_id: int,
    nodes: str | Sequence[str] = (),
    partition: str = "train",
    gpus: int = 4,
    *,
    state: JobState = JobState.RUNNING,
    limit_h: float | None = 10.0,
    ran_h: float = 1.0,
    tag: str | None = None,
    reason: str = "",
) -> Job:
    """A job; ``limit_h`` 10 h with 4 GPUs fits only the (preemptible) training class of the default
    policy, 2 h fits interactive (not preemptible) too."""
    names = (nodes,) if isinstance(nodes, str) else tuple(nodes)
    running = state is not JobState.PENDING
    return Job(
        id=str(job_id), job_id=job_id, name=f"j{job_id}", user="alice", account="lab", partition=partition,
        state=state, num_nodes=max(len(names), 1), nodes=names, gpus=gpus, qos="normal",
        submit=T0 - timedelta(hours=ran_h + 1), start=T0 - timedelta(hours=ran_h) if running else None,
        time_limit_s=round(limit_h * HOUR) if limit_h is not None else None, reason=reason, tag=tag,
    )  # fmt: skip


def replica(job_id: int, node: str, deployment: str, index: int = 0, gpus: int = 4) -> Job:
    return job(job_id, node, "infer", gpus, limit_h=12, tag=replica_tag(deployment, index))


def pending(job_id: int, gpus: int, partition: str = "train", reason: str = "Resources") -> Job:
    return job(job_id, (), partition, gpus, state=JobState.PENDING, reason=reason)


def snapshot(
    site: SiteConfig = MINI,
    inference: Iterable[str] | None = None,
    jobs: Iterable[Job] = (),
    down: Iterable[str] = (),
    now: datetime = T0,
) -> ClusterSnapshot:
    """Every site node, on its starting side except the pool nodes listed in ``inference`` (default: the
    pool's inference side), in the shared partition too, with the jobs' GPUs allocated."""
    jobs = tuple(jobs)
    pool = set(site.managed_pool.training + site.managed_pool.inference)
    on_inference = set(site.managed_pool.inference if inference is None else inference)
    fixed_inference = set(site.partitions.inference.nodes) - pool
    names = site.partition_names()
    nodes = []
    for name in site.all_nodes():
        side = "inference" if name in on_inference or name in fixed_inference else "training"
        alloc = sum(
            j.gpus // max(len(j.nodes), 1) for j in jobs if name in j.nodes and j.state is JobState.RUNNING
        )
        parts = (names[side], *(names[r] for r in ("shared",) if r in names))
        state = "down" if name in set(down) else ("allocated" if alloc else "idle")
        gpus = site.gpus_of(name)
        nodes.append(Node(name, state, partitions=parts, gpus_total=gpus, gpus_alloc=min(alloc, gpus),
                          switch=site.leaf_of(name)))  # fmt: skip
    return ClusterSnapshot(now, tuple(nodes), jobs, ())


def node_of(snap: ClusterSnapshot, name: str) -> Node:
    seen = snap.node(name)
    assert seen is not None, name
    return seen


BUSY = [job(901 + i, f"node{i + 1}") for i in range(4)]  # minicluster training's 16 GPUs all in use


NO_DEMAND, FRESH = Demand(0.0, 0.0), PlannerState()


def plan(
    snap: ClusterSnapshot,
    forecast: Demand = NO_DEMAND,
    policy: Policy = EAGER,
    site: SiteConfig = MINI,
    state: PlannerState = FRESH,
    history: DemandHistory = (),
    now: datetime = T0,
) -> tuple[RebalancePlan, PlannerState]:
    return plan_rebalance(snap, history, forecast, policy, site, now, state)


def moved(result: RebalancePlan | tuple[RebalancePlan, PlannerState]) -> list[tuple[str, Side]]:
    p = result[0] if isinstance(result, tuple) else result
    return [(m.node, m.dst) for m in p.moves]


def text(p: RebalancePlan) -> str:
    return "\n".join([*p.reasons, *(m.reason for m in p.moves)])


# --- demand -------------------------------------------------------------------------------------------


def test_demand_now_counts_each_sides_queue_and_running_jobs() -> None:
    jobs = [
        job(1, "node1", gpus=4),
        pending(2, 8),
        pending(3, 16, reason="JobHeldUser"),  # held: no node would start it
        pending(4, 4, partition="train,all"),
        replica(5, "node5", "llama"),
        pending(6, 4, partition="infer"),
        job(7, "node2", partition="all", gpus=4),  # the shared partition drives neither side
        job(8, "node3", state=JobState.COMPLETED),
    ]
    assert demand_now(snapshot(jobs=jobs), MINI) == Demand(training_gpus=16.0, inference_gpus=8.0)


# --- which way, how many ------------------------------------------------------------------------------


def test_training_backlog_takes_idle_inference_nodes() -> None:
    p, state = plan(snapshot(jobs=[*BUSY, pending(1, 16), pending(2, 8)]), policy=POLICY)
    assert moved(p) == [("node5", TRAIN), ("node6", TRAIN)]  # two nodes: no need to wait cycles
    assert p.target_inference_nodes == 0
    assert all(m.src is INFER and not m.preempt for m in p.moves)
    assert "training backlog 24 GPUs" in text(p)
    assert [m.node for m in state.moved] == ["node5", "node6"]


def test_spare_inference_nodes_stay_without_a_backlog() -> None:
    p, _ = plan(snapshot())
    assert p.empty
    assert p.target_inference_nodes == 2
    assert "hold" in text(p)


def test_the_backlog_takes_only_as_many_nodes_as_it_fills() -> None:
    p, _ = plan(snapshot(jobs=[*BUSY, pending(1, 4)]))
    assert moved(p) == [("node5", TRAIN)]


def test_inference_keeps_nodes_it_needed_within_the_release_window() -> None:
    snap = snapshot(jobs=[*BUSY, pending(1, 32)])
    recent: DemandHistory = [(at(-600), Demand(0.0, 8.0))]  # 10 minutes ago inference needed 8 GPUs
    p, _ = plan(snap, history=recent)
    assert moved(p) == [("node5", TRAIN)]  # 8 x 1.2 - 8 fixed = 1.6 GPUs: one pool node stays
    long_ago: DemandHistory = [(at(-2 * HOUR), Demand(0.0, 8.0))]
    assert len(plan(snap, history=long_ago)[0].moves) == 2


def test_inference_forecast_takes_idle_training_nodes_first() -> None:
    snap = snapshot(jobs=[job(1, "node3")])  # node3 runs a preemptible training job, node4 is idle
    p, _ = plan(snap, Demand(0.0, 20.0))  # 20 x 1.2 = 24 GPUs - 8 fixed = 16: 4 pool nodes, 2 more
    assert p.target_inference_nodes == 4
    assert [m.node for m in p.moves] == ["node4", "node3"]
    assert p.moves[0].preempt == () and p.moves[1].preempt == ("1",)


def test_current_inference_jobs_count_even_without_a_forecast() -> None:
    jobs = [pending(i, 4, partition="infer") for i in range(1, 6)]  # the autoscaler wants 5 replicas
    p, _ = plan(snapshot(jobs=jobs), Demand(0.0, 0.0))
    assert moved(p) == [("node3", INFER), ("node4", INFER)]  # 20 x 1.2 - 8 fixed = 16 GPUs: 4 pool nodes
    assert p.target_inference_nodes == 4


def test_whole_leaves_stay_with_training() -> None:
    snap = snapshot(LEAFY, inference={"t8"})  # leafB already lent one node
    p, _ = plan(snap, Demand(0.0, 25.0), site=LEAFY)  # 30 GPUs - 16 fixed: 2 pool nodes, 1 more
    assert moved(p) == [("t7", INFER)]  # not t3: leafA stays whole
    p, _ = plan(snap, Demand(0.0, 45.0), site=LEAFY, policy=rules(hysteresis_cycles=1, max_moves_per_cycle=3))
    assert [m.node for m in p.moves] == ["t7", "t3", "t4"]  # leafB first, until it has none left


def test_idle_comes_before_whole_leaves() -> None:
    snap = snapshot(LEAFY, inference={"t8"}, jobs=[job(1, "t7", gpus=8)])
    p, _ = plan(snap, Demand(0.0, 25.0), site=LEAFY)
    assert moved(p) == [("t3", INFER)]


def test_never_a_node_outside_the_managed_pool() -> None:
    p, _ = plan(snapshot(), Demand(0.0, 1000.0), policy=rules(hysteresis_cycles=1, max_moves_per_cycle=8))
    assert sorted(m.node for m in p.moves) == ["node3", "node4"]
    p, _ = plan(snapshot(jobs=[pending(1, 1000)]), policy=rules(max_moves_per_cycle=8))
    assert sorted(m.node for m in p.moves) == ["node5", "node6"]


def test_example_onprem_burst_moves_only_its_pool() -> None:
    p, _ = plan(snapshot(ONPREM), Demand(0.0, 400.0), site=ONPREM, policy=rules(max_moves_per_cycle=16))
    assert sorted(m.node for m in p.moves) == [f"gpu{n:03d}" for n in range(33, 41)]
    assert p.target_inference_nodes == 16
    assert "capped at the 16 usable pool nodes" in text(p)


# --- bounds, hysteresis, cooldown, pace -----------------------------------------------------------


def test_min_inference_nodes_holds_back_a_backlog() -> None:
    p, _ = plan(snapshot(jobs=[pending(1, 32)]), policy=rules(hysteresis_cycles=1, min_inference_nodes=3))
    assert moved(p) == [("node5", TRAIN)]  # 2 fixed + 1 pool node stay
    assert "bounded" in text(p)


def test_a_broken_bound_is_repaired_at_once() -> None:
    snap = snapshot(inference={"node4", "node5", "node6"})  # 5 inference nodes
    p, _ = plan(snap, policy=rules(max_inference_nodes=4))  # hysteresis 3 cycles, yet it moves now
    assert moved(p) == [("node4", TRAIN)]
    assert p.target_inference_nodes == 2


def test_max_moves_per_cycle_then_the_rest_without_waiting() -> None:
    policy = rules(max_moves_per_cycle=1)
    snap = snapshot(jobs=[pending(1, 32)])
    p, state = plan(snap, policy=policy)
    assert moved(p) == [("node5", TRAIN)]
    assert "at most 1 moves per cycle" in text(p)
    p, state = plan(snap, policy=policy, state=state, now=at(60))  # node5 still shows as inference
    assert moved(p) == [("node6", TRAIN)]  # ... but counts as training: only node6 goes
    p, _ = plan(snap, policy=policy, state=state, now=at(120))
    assert p.empty


def test_one_node_change_waits_for_the_hysteresis_cycles() -> None:
    snap, forecast = snapshot(), Demand(0.0, 14.0)  # 16.8 - 8 = 8.8 GPUs: 3 pool nodes, 1 more
    state = PlannerState()
    for cycle in range(3):
        p, state = plan(snap, forecast, POLICY, state=state, now=at(60 * cycle))
        assert p.empty == (cycle < 2), cycle
    assert moved(p) == [("node3", INFER)]
    waiting, _ = plan(snap, forecast, POLICY, state=PlannerState((), INFER, 1))
    assert "hold: inference wants 1 more pool node(s), for 2 of 3 cycles" in text(waiting)


def test_demand_hovering_at_a_boundary_never_flaps() -> None:
    hovering = [Demand(0.0, 14.0 if cycle % 2 else 12.0) for cycle in range(30)]  # 3 pool nodes, 2, 3, ...
    assert cycles(snapshot(), hovering) == []
    swinging = [Demand(0.0, 0.0 if cycle % 2 else 14.0) for cycle in range(30)]  # +1, -1 (backlog), ...
    assert cycles(snapshot(jobs=[*BUSY, pending(1, 4)]), swinging) == []


def cycles(snap: ClusterSnapshot, forecasts: Sequence[Demand]) -> list[NodeMove]:
    """The moves of one cycle a minute, the state carried over."""
    state, moves = PlannerState(), list[NodeMove]()
    for cycle, forecast in enumerate(forecasts):
        p, state = plan(snap, forecast, POLICY, state=state, now=at(60 * cycle))
        moves += p.moves
    return moves


def test_cooldown_keeps_a_node_that_just_moved() -> None:
    state = PlannerState(moved=(Moved("node5", INFER, at(-600)),))  # it came from training 10 min ago
    snap = snapshot(jobs=[pending(1, 32)])
    p, _ = plan(snap, state=state)
    assert moved(p) == [("node6", TRAIN)]
    assert "node5: moved 600s ago; cooldown 1800s" in text(p)
    later, _ = plan(snap, state=state, now=at(POLICY.rebalance.cooldown_s))
    assert sorted(moved(later)) == [("node5", TRAIN), ("node6", TRAIN)]


def test_a_node_on_its_way_counts_on_its_new_side() -> None:
    state = PlannerState(moved=(Moved("node3", INFER, at(-60)),))
    snap = snapshot()  # Slurm still lists node3 in training (the executor is draining it)
    p, _ = plan(snap, Demand(0.0, 14.0), state=state)  # 3 pool nodes wanted: node3 is the third
    assert p.empty and p.target_inference_nodes == 3


# --- busy nodes -----------------------------------------------------------------------------------


def test_preemptible_job_gets_preempt_and_the_class_grace() -> None:
    snap = snapshot(jobs=[job(11, "node3"), job(12, "node4", gpus=8, limit_h=48)])
    p, _ = plan(snap, Demand(0.0, 20.0))
    assert {m.node: (m.preempt, m.grace_s) for m in p.moves} == {
        "node3": (("11",), 120),
        "node4": (("12",), 120),
    }
    assert all("preempts" in m.reason for m in p.moves)


def test_job_that_may_be_interactive_is_not_preempted() -> None:
    snap = snapshot(jobs=[job(11, "node3", limit_h=2), job(12, "node4", limit_h=2)])  # fits interactive too
    p, _ = plan(snap, Demand(0.0, 20.0))
    assert p.empty
    assert "node3: job 11 (class interactive/training) is not preemptible; waiting for it to end" in text(p)


def test_non_preemptible_job_blocks_only_its_node() -> None:
    snap = snapshot(jobs=[job(11, "node3", limit_h=2), job(12, "node4")])
    p, _ = plan(snap, Demand(0.0, 20.0))
    assert moved(p) == [("node4", INFER)]
    assert "waiting for it to end" in text(p)


def test_job_of_no_class_is_not_preempted() -> None:
    p, _ = plan(snapshot(jobs=[job(11, "node3", limit_h=None), job(12, "node4", gpus=64)]), Demand(0.0, 20.0))
    assert p.empty


def test_job_close_to_its_end_is_waited_for() -> None:
    ending = job(11, "node3", limit_h=4.1, ran_h=4.0)  # 6 minutes left (over 4 h: training only)
    p, _ = plan(snapshot(jobs=[ending, job(12, "node4")]), Demand(0.0, 14.0))
    assert moved(p) == [("node4", INFER)]
    p, _ = plan(snapshot(jobs=[ending, job(12, "node4", limit_h=4.1, ran_h=4)]), Demand(0.0, 14.0))
    assert p.empty
    assert "ends within 360s; waiting for it rather than preempting" in text(p)


def test_longest_running_to_go_is_preempted_first() -> None:
    snap = snapshot(jobs=[job(11, "node3", limit_h=5), job(12, "node4", limit_h=40)])
    assert moved(plan(snap, Demand(0.0, 14.0))) == [("node4", INFER)]


def test_shared_partition_jobs_neither_block_nor_get_preempted() -> None:
    snap = snapshot(jobs=[job(11, "node3", partition="all", limit_h=2)])
    p, _ = plan(snap, Demand(0.0, 14.0))
    assert moved(p) == [("node3", INFER)] and p.moves[0].preempt == ()


def test_returning_prefers_nodes_without_replicas() -> None:
    snap = snapshot(
        jobs=[*BUSY, pending(1, 4), replica(21, "node5", "llama"), replica(22, "node7", "llama", 1)]
    )
    p, _ = plan(snap)
    assert moved(p) == [("node6", TRAIN)]


def test_returning_takes_replicas_with_the_inference_grace_but_never_the_last() -> None:
    jobs = [
        pending(1, 32),
        replica(21, "node5", "llama", gpus=1),  # llama's only replica
        replica(22, "node6", "mistral", gpus=1),
        replica(23, "node7", "mistral", 1, gpus=1),
    ]  # 3 GPUs of replicas fit on the fixed inference nodes: both pool nodes could go
    p, _ = plan(snapshot(jobs=jobs))
    assert [(m.node, m.preempt, m.grace_s) for m in p.moves] == [("node6", ("22",), 60)]
    assert "node5: holds the last running replica of llama" in text(p)


def test_two_nodes_holding_a_deployments_last_two_replicas_keep_one() -> None:
    jobs = [pending(1, 32), replica(21, "node5", "llama", gpus=1), replica(22, "node6", "llama", 1, gpus=1)]
    p, _ = plan(snapshot(jobs=jobs))
    assert moved(p) == [("node5", TRAIN)]
    assert "node6: holds the last running replica of llama" in text(p)


def test_unavailable_pool_node_is_left_alone() -> None:
    p, _ = plan(snapshot(down={"node3"}), Demand(0.0, 20.0))
    assert moved(p) == [("node4", INFER)]
    assert "node3: unavailable (down); left alone" in text(p)


def test_state_round_trips_through_json() -> None:
    state = PlannerState((Moved("node5", TRAIN, T0),), INFER, 2)
    assert PlannerState.from_json(state.to_json()) == state
    assert PlannerState.from_json({}) == PlannerState()


# --- properties over random clusters --------------------------------------------------------------

SITES = {"mini": MINI, "onprem": ONPREM, "leafy": LEAFY}
KINDS = ("idle", "training", "interactive", "ending", "replica", "shared")


@st.composite
def scenario(draw: st.DrawFn) -> dict[str, Any]:
    site = SITES[draw(st.sampled_from(sorted(SITES)))]
    pool = sorted(site.managed_pool.training + site.managed_pool.inference)
    inference = draw(st.sets(st.sampled_from(pool)))
    down = draw(st.sets(st.sampled_from(pool), max_size=2))
    jobs, deployments = [], ("a", "b", "c")
    for index, node in enumerate(site.all_nodes()):
        kind = draw(st.sampled_from(KINDS))
        jobs += _jobs_of(kind, index, node, draw(st.sampled_from(deployments)))
    jobs.append(pending(9999, draw(st.integers(0, 200))))
    cooling = draw(st.sets(st.sampled_from(pool), max_size=3))
    recent = [
        Moved(n, draw(st.sampled_from(list(Side))), at(-draw(st.integers(0, 3000)))) for n in sorted(cooling)
    ]
    state = PlannerState(tuple(recent), draw(st.sampled_from([None, *Side])), draw(st.integers(0, 4)))
    return {
        "site": site,
        "snap": snapshot(site, inference, jobs, down),
        "forecast": Demand(draw(st.floats(0, 300)), draw(st.floats(0, 300))),
        "policy": rules(**draw(_rules(site))),
        "state": state,
        "history": [(at(-draw(st.integers(0, 4000))), Demand(0.0, draw(st.floats(0, 300))))],
    }


def _jobs_of(kind: str, index: int, node: str, deployment: str) -> list[Job]:
    job_id = 100 + index
    return {
        "idle": [],
        "training": [job(job_id, node)],
        "interactive": [job(job_id, node, limit_h=2)],
        "ending": [job(job_id, node, limit_h=4.05, ran_h=4.0)],
        "replica": [replica(job_id, node, deployment, index)],
        "shared": [job(job_id, node, partition="all")],
    }[kind]


@st.composite
def _rules(draw: st.DrawFn, site: SiteConfig) -> dict[str, Any]:
    """Rebalance rules whose node bounds some split satisfies."""
    total = len(site.partitions.training.nodes) + len(site.partitions.inference.nodes)
    inference = draw(st.integers(0, total))  # a side total the bounds must allow
    return {
        "min_inference_nodes": draw(st.integers(0, inference)),
        "max_inference_nodes": draw(st.one_of(st.none(), st.integers(inference, total))),
        "min_training_nodes": draw(st.integers(0, total - inference)),
        "max_training_nodes": draw(st.one_of(st.none(), st.integers(total - inference, total))),
        "max_moves_per_cycle": draw(st.integers(1, 4)),
        "hysteresis_cycles": draw(st.integers(1, 3)),
        "headroom": draw(st.floats(0, 1)),
    }


def side_of(snap: ClusterSnapshot, site: SiteConfig, node: str) -> Side:
    seen = snap.node(node)
    assert seen is not None
    return INFER if site.partition_names()["inference"] in seen.partitions else TRAIN


def run(case: Mapping[str, Any], **changes: Any) -> tuple[RebalancePlan, PlannerState]:
    case = {**case, **changes}
    return plan_rebalance(
        case["snap"], case["history"], case["forecast"], case["policy"], case["site"], T0, case["state"]
    )


@settings(max_examples=150, deadline=None)
@given(case=scenario())
def test_moves_only_free_pool_nodes_once_each_one_way(case: dict[str, Any]) -> None:
    site, snap, state = case["site"], case["snap"], case["state"]
    p, after = run(case)
    pool = set(site.managed_pool.training + site.managed_pool.inference)
    cooling = {
        m.node for m in state.moved if (T0 - m.at).total_seconds() < case["policy"].rebalance.cooldown_s
    }
    nodes = [m.node for m in p.moves]
    assert set(nodes) <= pool - cooling
    assert len(nodes) == len(set(nodes)) <= case["policy"].rebalance.max_moves_per_cycle
    assert len({m.dst for m in p.moves}) <= 1
    for m in p.moves:
        assert m.src is side_of(snap, site, m.node) and m.dst is m.src.other
        assert node_of(snap, m.node).available
    assert p.reasons
    assert {m.node for m in after.moved} >= set(nodes)


def fits(rules: RebalanceRules, inference: int, training: int) -> bool:
    return rules.min_inference_nodes <= inference <= (
        rules.max_inference_nodes or inference
    ) and rules.min_training_nodes <= training <= (rules.max_training_nodes or training)


@settings(max_examples=150, deadline=None)
@given(case=scenario())
def test_target_within_bounds_and_moves_towards_it(case: dict[str, Any]) -> None:
    site, snap, r = case["site"], case["snap"], case["policy"].rebalance
    p, _ = run(case, state=PlannerState())  # no node in transit: sides are what Slurm says
    pool = set(site.managed_pool.training + site.managed_pool.inference)
    usable = {n for n in pool if node_of(snap, n).available}
    still = [side_of(snap, site, n) for n in site.all_nodes() if n not in usable]
    inference, training = still.count(INFER), still.count(TRAIN)  # nodes that do not move this cycle
    if any(fits(r, inference + t, training + len(usable) - t) for t in range(len(usable) + 1)):
        target = p.target_inference_nodes
        assert fits(r, inference + target, training + len(usable) - target)
    now_on = sum(1 for n in usable if side_of(snap, site, n) is INFER)
    after = now_on + sum(1 if m.dst is INFER else -1 for m in p.moves)
    assert min(now_on, p.target_inference_nodes) <= after <= max(now_on, p.target_inference_nodes)


@settings(max_examples=100, deadline=None)
@given(case=scenario())
def test_never_preempts_a_protected_job_nor_the_last_replica(case: dict[str, Any]) -> None:
    site, snap = case["site"], case["snap"]
    p, _ = run(case)
    by_id = {j.id: j for j in snap.jobs}
    for m in p.moves:
        for job_id in m.preempt:
            held = by_id[job_id]
            assert m.node in held.nodes
            assert held.tag or held.time_limit_s == 10 * HOUR  # a replica, or a training-only job
        shared = site.partitions.shared.name if site.partitions.shared else None
        holding = {
            j.id
            for j in snap.jobs
            if m.node in j.nodes and j.state is JobState.RUNNING and j.partition != shared
        }
        assert holding == set(m.preempt)
    leaving = {m.node for m in p.moves if m.dst is TRAIN}
    for name in {j.tag for j in snap.jobs if j.tag}:
        deployment = name.split(":")[2]
        serving = [j for j in snap.jobs if j.tag and j.tag.split(":")[2] == deployment]
        assert any(not set(j.nodes) & leaving for j in serving), deployment


@settings(max_examples=60, deadline=None)
@given(case=scenario(), seed=st.randoms(use_true_random=False))
def test_deterministic_whatever_the_order_of_nodes_and_jobs(case: dict[str, Any], seed: Any) -> None:
    snap: ClusterSnapshot = case["snap"]
    nodes, jobs = list(snap.nodes), list(snap.jobs)
    seed.shuffle(nodes)
    seed.shuffle(jobs)
    shuffled = replace(snap, nodes=tuple(nodes), jobs=tuple(jobs))
    assert run(case) == run(case) == run(case, snap=shuffled)


def test_every_plan_says_why() -> None:
    for p in (
        plan(snapshot())[0],
        plan(snapshot(jobs=[pending(1, 32)]))[0],
        plan(snapshot(), Demand(0, 14), POLICY)[0],
    ):
        assert p.reasons and all(isinstance(r, str) and r for r in p.reasons)
    assert isinstance(plan(snapshot(jobs=[pending(1, 32)]))[0].moves[0], NodeMove)


def test_bad_rebalance_rules_are_refused() -> None:
    with pytest.raises(ValueError, match="below min_inference_nodes"):
        rules(min_inference_nodes=3, max_inference_nodes=2)
    with pytest.raises(ValueError, match="does not divide a day"):
        rules(profile_slot_s=7000)
