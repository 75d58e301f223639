"""The trace-driven simulator (hpcserve/replay): FIFO + EASY backfill on a tiny site, an inference burst under
fixed and foresighted splits, the oracle, what the autoscaler sees, node drains, determinism, the traces'
readers and scaling, the CLI, and the four policies end to end on a short slice of the shared traces."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hpcserve.cli.main import Context
from hpcserve.cli.simulate_cmd import SIM_POLICIES, simulate
from hpcserve.config import SiteConfig
from hpcserve.rebalance.planner import demand_now
from hpcserve.rebalance.types import NodeMove, Side
from hpcserve.replay.compare import EXTRA, LENDING, POLICIES, Inputs, make_policy, replay, run_policies
from hpcserve.replay.engine import Replay
from hpcserve.replay.inference import InferenceSide, Waits
from hpcserve.replay.metrics import percentile
from hpcserve.replay.overlap import OverlapPolicy, gentle_victims, slurm_victims
from hpcserve.replay.planned import Foresight, PlannerPolicy
from hpcserve.replay.policies import IdealSplit, SplitDecision, SplitView, StaticPolicy
from hpcserve.replay.scenario import AT0, Scenario, SimSettings, build_scenario, default_policy
from hpcserve.replay.traces import (
    InferenceWorkload,
    Pod,
    RateCurve,
    TrainingJob,
    TrainingWorkload,
    job_shape,
    read_inference,
    read_pods,
    scale_training,
)
from hpcserve.replay.training import TrainingSide
from tests.conftest import TRACES

HOUR = 3600.0


def tiny_site() -> SiteConfig:
    """Four training nodes t[1-4] (t3-t4 in the managed pool) and four inference nodes i[1-4]
    (i3-i4 in the pool): inference has 2 to 6 nodes. 8 GPUs each, two leaf switches."""
    return SiteConfig.model_validate(
        {
            "name": "tiny",
            "cluster": "tiny",
            "nodes": [{"names": "t[1-4]", "gpus": 8}, {"names": "i[1-4]", "gpus": 8}],
            "partitions": {
                "training": {"name": "train", "nodes": "t[1-4]"},
                "inference": {"name": "infer", "nodes": "i[1-4]"},
                "shared": {"name": "all", "nodes": "t[1-4],i[1-4]"},
            },
            "managed_pool": {"training": "t[3-4]", "inference": "i[3-4]"},
            "fabrics": {"ib": {"kind": "infiniband", "hcas": ["mlx5_0"]}},
            "switches": {
                "leaf1": {"nodes": "t[1-4]", "fabric": "ib"},
                "leaf2": {"nodes": "i[1-4]", "fabric": "ib"},
            },
            "storage": {"cold": {"path": "/shared/models"}},
        }
    )


def flat_inference(rate: float = 1.0) -> InferenceWorkload:
    return InferenceWorkload(RateCurve((0.0,), (rate,), 86400.0), 1155.0, 211.0, "flat")


def scenario_with(jobs: list[TrainingJob], inference: InferenceWorkload, **settings: Any) -> Scenario:
    """A scenario on the tiny site with exactly these training jobs (no trace scaling)."""
    site = tiny_site()
    knobs: dict[str, Any] = {"days": 0.05, "warmup_days": 0.0, "noise": False, "inference_peak": 0.2}
    scenario = build_scenario(site, default_policy(site), [], inference, SimSettings(**(knobs | settings)))
    offered = sum(j.duration * j.gpus for j in jobs) / scenario.settings.span_s
    return dataclasses.replace(scenario, training=TrainingWorkload(tuple(jobs), 1.0, offered))


def job(index: int, submit: float, nodes: int, duration: float) -> TrainingJob:
    return TrainingJob(index, submit, duration, nodes, 8)


def starts(replay: Replay) -> dict[int, float]:
    return {j: run.end - run.job.duration for j, run in replay.training.runs.items() if run.end is not None}


# --- training: FIFO + EASY backfill -------------------------------------------------------------------


def test_fifo_with_easy_backfill_on_four_nodes() -> None:
    """Static split keeps the four training nodes. Job 1 (4 nodes) must wait for job 0 and reserves t=100;
    job 2 fits before that and is backfilled; job 3 would run past the reservation on reserved nodes, so
    it waits for job 1 to end, FIFO after it."""
    jobs = [job(0, 0, 2, 100), job(1, 1, 4, 50), job(2, 2, 2, 50), job(3, 3, 1, 200)]
    run = Replay(scenario_with(jobs, flat_inference()), StaticPolicy(4))
    result = run.run()
    assert starts(run) == {0: 0.0, 1: 100.0, 2: 2.0, 3: 150.0}
    assert result.jobs == 4 and result.finished == 4
    assert result.queue_mean_s == pytest.approx((0 + 99 + 0 + 147) / 4)
    assert result.preemptions == 0 and result.moves == 0


def test_backfill_uses_nodes_the_reservation_leaves_spare() -> None:
    """Job 1 needs 3 nodes at t=100, so one node is spare then: a long 1-node job may start at once."""
    jobs = [job(0, 0, 2, 100), job(1, 1, 3, 50), job(2, 2, 1, 1000)]
    run = Replay(scenario_with(jobs, flat_inference()), StaticPolicy(4))
    run.run()
    assert starts(run) == {0: 0.0, 1: 100.0, 2: 2.0}


def test_placement_keeps_jobs_on_one_leaf_and_never_beyond_the_training_side() -> None:
    jobs = [job(i, 0, 1, 30) for i in range(6)]
    run = Replay(scenario_with(jobs, flat_inference()), StaticPolicy(4))
    run.run()
    assert starts(run) == {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0, 4: 30.0, 5: 30.0}


def test_a_node_taken_for_inference_preempts_its_job_which_loses_work_since_its_checkpoint() -> None:
    """The pool goes to inference from t=1000 to t=2000 while a 4-node job runs: the job is signalled at
    the tick of 1020, killed 120 s later (1140 s run, checkpoint at 600 s: 540 s lost), requeued, and
    runs its remaining 2400 s once the nodes are back (tick 2040 + 120 s move)."""
    jobs = [job(0, 0, 4, 3000)]
    scenario = scenario_with(jobs, flat_inference(), checkpoint_interval_s=600.0, days=0.2)

    class LendForAWhile:
        name = "lend"

        def decide(self, view: SplitView) -> SplitDecision:
            return SplitDecision(inference_nodes=6 if 1000 <= view.now < 2000 else 2)

    run = Replay(scenario, LendForAWhile())
    result = run.run()
    victim = run.training.runs[0]
    assert result.preemptions == 1 and victim.preemptions == 1
    assert victim.lost_s == pytest.approx(540.0)
    assert result.lost_gpu_h == pytest.approx(540 * 32 / 3600)
    assert victim.waited == pytest.approx(2160.0 - 1140.0)
    assert victim.end == pytest.approx(2160.0 + 2400.0)
    assert result.moves == 8  # the whole pool (4 nodes) there and back; the split at t=0 is free


# --- inference ----------------------------------------------------------------------------------------


def burst() -> InferenceWorkload:
    """0.2 of the peak, a ramp to the peak at 4 h, the peak for 1.5 h, back down by 6 h; 8 h period."""
    times = (0.0, 4 * HOUR, 4.5 * HOUR, 6 * HOUR, 6.5 * HOUR)
    return InferenceWorkload(RateCurve(times, (0.2, 0.2, 1.0, 1.0, 0.2), 8 * HOUR), 1155.0, 211.0, "burst")


def test_an_inference_burst_needs_the_pool_static_at_peak_and_the_oracle_meet_the_slo() -> None:
    """The peak needs the whole pool (6 inference nodes) only for about two hours of eight."""
    scenario = scenario_with([], burst(), days=8 / 24, inference_peak=0.7)
    assert scenario.need_nodes(0, scenario.settings.span_s) == 6
    peak = replay(scenario, "static", default_policy(scenario.site))
    short = Replay(scenario, StaticPolicy(scenario.min_inference_nodes)).run()
    oracle = replay(scenario, "oracle", default_policy(scenario.site))
    assert peak.mean_inference_nodes == 6 and peak.slo_attainment > 0.99
    assert short.slo_attainment < 0.8 and short.p99_wait_s > 600
    assert oracle.slo_attainment > 0.99
    assert oracle.mean_inference_nodes < 5.5 and oracle.moves >= 2


def test_the_oracle_is_the_perfect_foresight_split_and_the_planner_told_the_truth_an_extra() -> None:
    """The oracle moves nodes like any target-count policy (the replay's moves, delays, drains and
    preemptions), looking ahead as far as a node taken from training needs before it serves."""
    scenario = scenario_with([], burst(), days=8 / 24, inference_peak=0.7)
    policy = default_policy(scenario.site)
    oracle = make_policy("oracle", scenario, policy)
    assert isinstance(oracle, IdealSplit) and oracle.name == "oracle"
    assert oracle.lead_s == 120 + 120 + 180 + 2 * 60  # grace, move, replica start, two rebalance ticks
    foresight = make_policy("planner-foresight", scenario, policy)
    assert isinstance(foresight, PlannerPolicy) and isinstance(foresight.ahead, Foresight)
    result = replay(scenario, "planner-foresight", policy)
    assert result.policy == "planner-foresight" and result.slo_attainment > 0.99


def test_the_autoscaler_sees_the_batches_little_s_law_gives() -> None:
    """Running requests are those admitted within the last service time (M / mu): with Poisson arrivals
    the count the autoscaler sees averages rate x M / mu (96 here) and varies as that many requests do
    (about 10%), not as one second's arrivals scaled up (1 / sqrt(12): 28%), which inflated its count."""
    scenario = scenario_with([], flat_inference(), noise=True, seed=3, days=0.1, inference_peak=0.5)
    serving, rate = scenario.serving, scenario.inference.curve.rate(0.0)
    side = InferenceSide(serving, scenario.arrivals, [f"i{k}" for k in range(1, 7)])
    side.warm_start()
    seen = []
    for second in range(600, 8000, 10):
        side.advance_to(second)
        seen.append(side._observation(side.now).running)
    expected = rate * serving.spec.max_num_seqs / serving.mu
    assert statistics.mean(seen) == pytest.approx(expected, rel=0.03)
    assert statistics.pstdev(seen) / expected < 0.2


@pytest.mark.parametrize(("grace", "arrives"), [(60, 60 + 30 + 120), (10, 60 + 10 + 120)])
def test_a_replica_node_drains_for_replica_drain_s_at_most_the_grace(grace: int, arrives: float) -> None:
    """Every policy pays the same drain: a node's replicas finish their requests in ``replica_drain_s``
    (30 s); the grace a planner's move names (the inference class's 60 s) only caps it."""

    class ReturnI3:
        name = "return-i3"

        def decide(self, view: SplitView) -> SplitDecision:
            if view.now != 60:
                return SplitDecision()
            move = NodeMove("i3", Side.INFERENCE, Side.TRAINING, "test", ("r2",), grace)
            return SplitDecision(moves=(move,))

    sides = []
    for end in (arrives - 5, arrives + 5):
        scenario = scenario_with([], flat_inference(), days=end / 86400, inference_peak=0.45)
        run = Replay(scenario, ReturnI3())
        run.run()
        assert run.moves == 1
        sides.append(run.side.get("i3"))
    assert sides == [None, Side.TRAINING]  # moving, then arrived


def test_waits_histogram_quantiles() -> None:
    waits = Waits()
    waits.add(0, 98.0)
    waits.add(3, 1.0)
    waits.add(20, 1.0)
    assert waits.share_within(3) == pytest.approx(0.99)
    assert waits.quantile(0.99) == 3 and waits.quantile(0.995) == 20
    assert percentile([5.0, 1.0, 3.0], 0.5) == 3.0 and percentile([], 0.9) == 0.0


# --- determinism ------------------------------------------------------------------------------------


def test_the_replay_is_deterministic_given_the_inputs_and_the_seed() -> None:
    jobs = [job(i, 60.0 * i, 1 + i % 3, 400.0 + 37 * i) for i in range(40)]
    scenario = scenario_with(jobs, burst(), days=8 / 24, inference_peak=0.7, noise=True, seed=7)
    policy = default_policy(scenario.site)
    first, second = (dataclasses.replace(replay(scenario, "predictive", policy), wall_s=0) for _ in range(2))
    assert first == second
    other = scenario_with(jobs, burst(), days=8 / 24, inference_peak=0.7, noise=True, seed=8)
    assert other.arrivals != scenario.arrivals


def test_the_snapshot_shows_the_demand_the_replay_samples() -> None:
    """Policies get the demand the planner would compute from the snapshot (planner.demand_now)."""
    jobs = [job(i, 10.0 * i, 2, 5000) for i in range(5)]
    scenario = scenario_with(jobs, burst(), days=0.05, inference_peak=0.7)
    run = Replay(scenario, StaticPolicy(2))
    run.run()
    view = run._view(scenario.settings.span_s)
    assert demand_now(view.snapshot(), scenario.site) == view.demand
    assert view.demand.training_gpus == 5 * 16


# --- traces -----------------------------------------------------------------------------------------


def test_job_shapes_are_whole_nodes_or_part_of_one() -> None:
    assert job_shape(1, 8, 8) == (1, 8)
    assert job_shape(4, 8, 8) == (4, 8)
    assert job_shape(1, 2, 8) == (1, 2)
    assert job_shape(3, 3, 8) == (2, 8)


def test_training_scaling_compresses_the_trace_tail_to_the_target_load() -> None:
    """96 hourly 1-GPU pods of 1 h: each is a 1-node job of 8 GPUs, cut to the 30-min time limit
    (14,400 GPU-s). 8 GPUs over one replay day take the last 48 pods, which span 47 trace hours."""
    pods = [Pod(submit=3600.0 * i, duration=3600.0, gpus=1) for i in range(96)]
    workload = scale_training(pods, days=1.0, per_node=8, gpu_scale=8, target_gpus=8.0, max_run_s=1800.0)
    assert workload.compression == pytest.approx(47 / 24)
    assert len(workload.jobs) == 48 and workload.jobs[0].submit == 0.0
    assert workload.jobs[-1].submit == pytest.approx(86400.0)
    assert all(j.duration == 1800.0 and j.gpus == 8 for j in workload.jobs)
    assert workload.offered_gpus == pytest.approx(8.0)
    assert workload.gpus_submitted(0.0, 3600.0 * 24 / 47 * 2.5) == 2 * 8  # (0, 2.5 trace hours]: 2 jobs


def test_rate_curve_is_linear_between_knots_and_repeats() -> None:
    curve = RateCurve((0.0, 100.0), (1.0, 3.0), 200.0, scale=2.0)
    assert curve.rate(50.0) == pytest.approx(4.0)
    assert curve.rate(150.0) == pytest.approx(4.0)  # back down to the first knot at 200
    assert curve.rate(250.0) == pytest.approx(4.0)
    assert curve.peak(0.0, 90.0) == pytest.approx(5.6) and curve.peak(0.0, 500.0) == pytest.approx(6.0)
    assert sum(curve.per_step(1.0, 200)) == pytest.approx(2.0 * 200 * 2.0)


def test_readers(tmp_path: Path) -> None:
    pods = tmp_path / "pods.csv"
    pods.write_text(
        "job_id,submit_time_s,start_time_s,end_time_s,duration_s,num_gpus\n"
        "a,10,10,70,60,2\nb,5,,,,1\nc,0,0,30,30,0\nd,1,1,31,30,1\n"
    )
    assert read_pods(pods) == [Pod(1.0, 30.0, 1), Pod(10.0, 60.0, 2)]
    requests = tmp_path / "requests.csv"
    requests.write_text("arrival_time_s,prompt_tokens,output_tokens\n0.5,100,10\n1.5,300,30\n61,200,20\n")
    workload = read_inference(requests, bin_s=60.0)
    assert (workload.prompt_tokens, workload.output_tokens) == (200.0, 20.0)
    assert workload.curve.period == 120.0 and workload.curve.rate(30.0) == pytest.approx(2 / 60)


# --- the CLI and the shared traces ------------------------------------------------------------------


def write_small_traces(folder: Path) -> tuple[Path, Path]:
    pods = folder / "pods.csv"
    rows = [f"p{i},{600 * i},{600 * i},,{1800 + 60 * (i % 7)},{1 + i % 2}" for i in range(200)]
    pods.write_text(
        "job_id,submit_time_s,start_time_s,end_time_s,duration_s,num_gpus\n" + "\n".join(rows) + "\n"
    )
    rates = folder / "rates.csv"
    windows = [f"language,m-large,{600 * w},{50 + 40 * ((w // 6) % 4)},3" for w in range(144)]
    rates.write_text(
        "category,model,window_start_s,total_rate_rps,active_clients\n" + "\n".join(windows) + "\n"
    )
    return pods, rates


def test_simulate_command_prints_json_per_policy(tmp_path: Path) -> None:
    pods, rates = write_small_traces(tmp_path)
    site = tmp_path / "site.yaml"
    site.write_text(json.dumps(tiny_site().model_dump(mode="json")))
    args = ["--training-trace", str(pods), "--inference-trace", str(rates), "--days", "0.1",
            "--warmup-days", "0.05", "--policy", "static", "--policy", "reactive", "--json"]  # fmt: skip
    result = CliRunner().invoke(simulate, args, obj=Context(site, None, None))
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [r["policy"] for r in data["results"]] == ["static", "reactive"]
    assert data["scenario"]["site"] == "tiny" and data["results"][0]["jobs"] > 0


def test_unknown_policy_names_the_choices() -> None:
    scenario = scenario_with([], flat_inference())
    with pytest.raises(Exception, match="use one of static, reactive, predictive, oracle"):
        make_policy("clairvoyant", scenario, default_policy(scenario.site))


@pytest.mark.skipif(not (TRACES / "servegen_total_rate_10min.csv").is_file(), reason="no shared traces")
def test_four_policies_on_a_slice_of_the_shared_traces() -> None:
    from hpcserve.config import load_site_config

    site = load_site_config(Path(__file__).resolve().parents[1] / "site_configs" / "example-onprem.yaml")
    inputs = Inputs(
        site, default_policy(site), TRACES / "alibaba_gpu2023_openb_pods.csv",
        TRACES / "servegen_total_rate_10min.csv", SimSettings(days=0.25, warmup_days=0.05),
    )  # fmt: skip
    results = run_policies(inputs, POLICIES)
    assert [r.policy for r in results] == list(POLICIES)
    for result in results:
        assert result.jobs > 50 and 0.9 < result.slo_attainment <= 1.0 and 0 < result.gpu_util < 1
        assert 16 <= result.mean_inference_nodes <= 32
    assert results[0].moves == 0 and results[0].mean_inference_nodes == 32


# --- lending through Slurm's preemption (hpcserve.replay.overlap) ----------------------------------------


def burst_inference(at: float, low: float = 1.0, high: float = 3.0) -> InferenceWorkload:
    """A flat rate that steps up at ``at`` (within one second) and stays up for the rest of the replay."""
    curve = RateCurve((0.0, at, at + 1.0), (low, low, high), 86400.0 * 10)
    return InferenceWorkload(curve, 1155.0, 211.0, "burst")


def running_side(submits: list[float], ends: dict[int, float] | None = None) -> TrainingSide:
    """The tiny site's training side on six nodes, one 1-node job started at each submit time (a job
    runs 10,000 s unless ``ends`` gives its run time); checkpoints every 600 s."""
    scenario = scenario_with([], flat_inference())
    nodes = ["t1", "t2", "t3", "t4", "i1", "i2"]
    jobs = [job(i, at, 1, (ends or {}).get(i, 10_000.0)) for i, at in enumerate(submits)]
    side = TrainingSide(jobs, nodes, scenario.gpus, scenario.topology, checkpoint_s=600.0, depth=100, at0=AT0)
    for j in jobs:
        side.submit(j, j.submit)
        side.schedule(j.submit)
    return side


def test_slurm_picks_the_lowest_priority_job_the_youngest_submission_or_the_latest_start() -> None:
    side = running_side([0.0, 100.0, 200.0, 300.0, 400.0, 500.0])
    node, victims = slurm_victims(side, "priority") or ("", ())
    assert victims == (5,) and side.running[5].nodes == (node,)
    side.running[2].start = 900.0  # started last (e.g. after a requeue): youngest_first takes it
    assert slurm_victims(side, "youngest") == (side.running[2].nodes[0], (2,))


def test_gentle_victims_checkpointed_most_recently_never_one_ending_within_the_spare_window() -> None:
    """At 1680 s the jobs started at 0..500 s are 480, 380, 280, 180, 80, 580 s past their checkpoint:
    job 4 loses least. Once job 4 ends within the spare window it is never picked: job 3 is."""
    side = running_side([0.0, 100.0, 200.0, 300.0, 400.0, 500.0])
    assert gentle_victims(side, 1680.0, spare_s=320.0) == (side.running[4].nodes[0], (4,))
    ending = running_side([0.0, 100.0, 200.0, 300.0, 400.0, 500.0], ends={4: 1500.0})
    assert gentle_victims(ending, 1680.0, spare_s=320.0) == (ending.running[3].nodes[0], (3,))
    assert gentle_victims(ending, 1680.0, spare_s=20_000.0) is None


def lending_scenario() -> Scenario:
    """Six 1-node jobs fill what the two warm replicas leave; the rate triples at 2000 s."""
    jobs = [job(i, 100.0 * i, 1, 20_000.0) for i in range(6)]
    return scenario_with(jobs, burst_inference(2000.0), checkpoint_interval_s=600.0, inference_peak=0.5)


def test_slurm_preempt_requeues_the_youngest_job_for_a_replica_with_its_work_since_the_checkpoint_lost() -> (
    None
):
    run = Replay(
        lending_scenario(), make_policy("slurm-preempt", lending_scenario(), default_policy(tiny_site()))
    )
    result = run.run()
    preempted = {j for j, r in run.training.runs.items() if r.preemptions}
    assert result.preemptions >= 1 and result.moves == 0
    assert min(preempted) > max(set(run.training.runs) - preempted)  # the youngest submissions
    youngest = run.training.runs[5]
    assert 0 < youngest.lost_s < 600.0 and youngest.saved_at is None  # since its periodic checkpoint
    assert result.lost_gpu_h == pytest.approx(sum(r.lost_s * 8 for r in run.training.runs.values()) / 3600)
    assert result.slo_attainment < 1.0  # the replicas start after the burst: grace + engine start


def test_overlap_prewarm_starts_replicas_before_the_burst_from_gentle_victims_that_save_on_signal() -> None:
    scenario = lending_scenario()
    policy = make_policy("prewarm-foresight", scenario, default_policy(tiny_site()))
    assert isinstance(policy, OverlapPolicy) and policy.victims == "gentle" and policy.save_on_signal
    run = Replay(scenario, policy)
    result = run.run()
    assert result.preemptions >= 1 and result.slo_attainment == 1.0 and result.p99_wait_s == 0.0
    preempted = [r for r in run.training.runs.values() if r.preemptions]
    assert all(r.lost_s == pytest.approx(scenario.settings.checkpoint_save_s) for r in preempted)
    baseline = Replay(scenario, make_policy("slurm-preempt", scenario, default_policy(tiny_site()))).run()
    assert result.lost_gpu_h < baseline.lost_gpu_h


def test_forecast_prewarm_and_the_lending_policies_run_on_the_cli_names() -> None:
    assert set(SIM_POLICIES) == set(POLICIES + EXTRA)
    scenario = lending_scenario()
    for name in LENDING:
        result = replay(scenario, name, default_policy(scenario.site))
        assert result.policy == name and result.jobs == 6


def test_request_traces_replay_at_their_real_timestamps(tmp_path: Path) -> None:
    trace = tmp_path / "requests.csv"
    trace.write_text(
        "arrival_time_s,prompt_tokens,output_tokens\n0.2,10,5\n0.7,10,5\n59.5,10,5\n119.0,10,5\n"
    )
    workload = read_inference(trace)
    assert workload.arrival_times == (0.2, 0.7, 59.5, 119.0)
    steps = workload.per_step(1.0, 240)
    assert steps[0] == 2.0 and steps[59] == 1.0 and steps[119] == 1.0 and steps[120] == 2.0
    assert sum(steps[1:59]) == 0.0
