"""Run several split policies on one scenario: the entry point the CLI and the benchmark share.

The policies (``POLICIES``; ``hpcserve.replay.policies`` says how each decides):
- static: a fixed split sized for the replay's inference peak;
- reactive, predictive: the service's rebalance planner told the demand now, or the forecast;
- oracle: the perfect-foresight reference, ``IdealSplit``: inference gets exactly the nodes the true
  load ahead needs, with no planner margins (headroom, hysteresis, cooldown, release only to a backlog),
  under the same replay mechanics as every policy (node moves take ``move_delay_s``, replicas on a node
  drain first, training jobs on a node get their grace and lose their work since the last checkpoint,
  every replica starts for ``replica_startup_s``);
- lending through Slurm's preemption, no node moves (``LENDING``; ``hpcserve.replay.overlap``): slurm-preempt
  (the baseline: overlapping partitions over every node, Slurm's own victims, lowest priority = youngest
  submission first), slurm-preempt-youngest (``PreemptParameters=youngest_first``: latest start first),
  overlap-prewarm (hpcserve's ``lending: overlap``: a pre-warm floor from what runs now plus the rise
  the forecast expects, the recent ramp, and for bursty traffic a standing share of the forecast:
  ``floor.RiseRate``;
  gentle victims that checkpoint on the signal), prewarm-foresight (the floor set from the true
  busiest 10 s ahead, from the replay's own arrivals), overlap-gentle (gentle victims that save on the
  signal, no pre-warm: what the victim choice alone does) and lending-bound (a near-lower bound on
  lending's cost to training: the replicas the true busiest 10 s of the next two ticks need, run full,
  on ``cost_free`` mechanics: no replica start, no grace, no lost work, no scale-down window; not a
  strict bound: the autoscaler's thresholds still apply and FIFO + backfill is a heuristic; its SLO is
  not a goal);
- extra (``EXTRA``, not run by default): planner-foresight, the planner told the true future demand over
  its horizon (``Foresight``): predictive against it is what the forecast alone costs.

``run_policies`` replays each policy on the same inputs. With ``workers`` > 1 the policies run in
separate processes, each building the scenario itself from the same inputs (the results are the same:
the replay is deterministic).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from hpcserve.config import Policy, SiteConfig
from hpcserve.errors import ValidationError
from hpcserve.replay.engine import Replay
from hpcserve.replay.floor import ForecastRate, RiseRate, TrueBursts, block_rates
from hpcserve.replay.metrics import PolicyResult
from hpcserve.replay.overlap import OverlapPolicy
from hpcserve.replay.planned import Forecaster, Foresight, PlannerPolicy, demand_now
from hpcserve.replay.policies import IdealSplit, SplitPolicy, StaticPolicy
from hpcserve.replay.scenario import Scenario, SimSettings, load_scenario
from hpcserve.serving.autoscaler import UP_UTILIZATION

POLICIES = ("static", "reactive", "predictive", "oracle")
LENDING = (
    "slurm-preempt",
    "slurm-preempt-youngest",
    "overlap-prewarm",
    "prewarm-foresight",
    "overlap-gentle",
    "lending-bound",
)
EXTRA = ("planner-foresight", *LENDING)  # not run by default
BURST_S = 10.0  # prewarm-foresight knows the busiest block this long ahead (the SLO's wait)
STANDING_SHARE = UP_UTILIZATION  # overlap-prewarm keeps this share of the forecast peak (bursty traffic)


@dataclass(frozen=True, slots=True)
class Inputs:
    """Everything a comparison replays: the site, the job classes and rebalance rules, both traces."""

    site: SiteConfig
    policy: Policy
    training_trace: Path
    inference_trace: Path
    settings: SimSettings

    def scenario(self) -> Scenario:
        return load_scenario(self.site, self.policy, self.training_trace, self.inference_trace, self.settings)


def static_nodes(scenario: Scenario) -> int:
    """Inference nodes for the replay's inference peak (what a fixed split must give it)."""
    return scenario.need_nodes(0.0, scenario.settings.span_s)


def make_policy(name: str, scenario: Scenario, policy: Policy) -> SplitPolicy:
    """One of ``POLICIES`` or ``EXTRA``, set up for ``scenario``."""
    site, horizon = scenario.site, policy.rebalance.horizon_s
    if name == "static":
        return StaticPolicy(static_nodes(scenario))
    if name == "reactive":
        return PlannerPolicy(name, policy, site, demand_now)
    if name == "predictive":
        return PlannerPolicy(name, policy, site, Forecaster(policy))
    if name == "oracle":
        return oracle(scenario, policy, name)
    if name in LENDING:
        return lending(name, scenario, policy)
    if name == "planner-foresight":
        truth = Foresight(scenario.need_gpus, scenario.training.gpus_submitted, horizon)
        return PlannerPolicy(name, policy, site, truth)
    raise ValidationError(f"unknown policy {name!r} (fix: use one of {', '.join(POLICIES + EXTRA)})")


def oracle(scenario: Scenario, policy: Policy, name: str = "oracle") -> IdealSplit:
    """The perfect-foresight split: it looks ahead as far as a node taken from training needs to serve
    (its jobs' grace, the move, a replica's start, two rebalance ticks), behind for the replicas the
    autoscaler keeps for its scale-down window, and holds nodes over the policy's release window."""
    s = scenario.settings
    return IdealSplit(
        scenario.need_nodes,
        lead_s=scenario.grace_s + s.move_delay_s + s.replica_startup_s + 2 * s.rebalance_interval_s,
        behind_s=scenario.serving.spec.scale_down_window_s,
        hold_s=policy.rebalance.release_window_s,
        name=name,
    )


def prewarm_horizon_s(scenario: Scenario) -> float:
    """How far ahead replicas are pre-warmed: the victim's grace, the engine's start, two autoscaler
    ticks (one to raise the floor, one to lend the node)."""
    s = scenario.settings
    return scenario.grace_s + s.replica_startup_s + 2 * s.autoscale_interval_s


def lending(name: str, scenario: Scenario, policy: Policy) -> OverlapPolicy:
    """One of ``LENDING`` (``hpcserve.replay.overlap``)."""
    if name == "slurm-preempt":
        return OverlapPolicy(name, victims="priority")
    if name == "slurm-preempt-youngest":
        return OverlapPolicy(name, victims="youngest")
    if name == "lending-bound":
        return lending_bound(scenario)
    horizon = prewarm_horizon_s(scenario)
    if name == "overlap-gentle":
        return OverlapPolicy(name, victims="gentle", save_on_signal=True, spare_s=horizon)
    source = (
        TrueBursts(block_rates(scenario.arrivals, scenario.settings.step_s, BURST_S), BURST_S, horizon)
        if name == "prewarm-foresight"
        else RiseRate(ForecastRate(policy.prewarm, horizon), horizon, share=STANDING_SHARE)
    )
    return OverlapPolicy(name, victims="gentle", save_on_signal=True, prewarm=source, spare_s=horizon)


def lending_bound(scenario: Scenario) -> OverlapPolicy:
    """The near-lower bound on lending's cost to training (replayed on ``cost_free(scenario)``): inference
    holds the replicas for the true busiest 10 s of the next two autoscaler ticks (a replica the floor
    adds is placed at the next lending tick), each run at most full."""
    rates = block_rates(scenario.arrivals, scenario.settings.step_s, BURST_S)
    source = TrueBursts(rates, BURST_S, 2 * scenario.settings.autoscale_interval_s)
    return OverlapPolicy(
        "lending-bound", victims="gentle", save_on_signal=True, prewarm=source, floor_load=1.0
    )


def cost_free(scenario: Scenario) -> Scenario:
    """``scenario`` without lending's costs: a replica is ready once placed, a victim leaves at its signal
    and loses nothing (it still requeues and waits), the autoscaler releases a replica as soon as the
    load allows (no scale-down window)."""
    settings = dataclasses.replace(
        scenario.settings, checkpoint_save_s=0.0, replica_startup_s=0.0, replica_stage_s=0.0
    )
    spec = scenario.serving.spec.model_copy(update={"scale_down_window_s": 0.0})
    serving = dataclasses.replace(scenario.serving, spec=spec, startup_s=0.0, stage_s=0.0)
    return dataclasses.replace(scenario, settings=settings, serving=serving, grace_s=0.0)


def check_names(names: Sequence[str]) -> None:
    unknown = [name for name in names if name not in POLICIES + EXTRA]
    if unknown:
        raise ValidationError(
            f"unknown policy {unknown[0]!r} (fix: use one of {', '.join(POLICIES + EXTRA)})"
        )


def replay(scenario: Scenario, name: str, policy: Policy) -> PolicyResult:
    if name == "lending-bound":
        scenario = cost_free(scenario)
    return Replay(scenario, make_policy(name, scenario, policy)).run()


def _replay_inputs(inputs: Inputs, name: str) -> PolicyResult:
    return replay(inputs.scenario(), name, inputs.policy)


def run_policies(
    inputs: Inputs,
    names: Sequence[str] = POLICIES,
    *,
    workers: int = 1,
    progress: Callable[[PolicyResult], None] | None = None,
    scenario: Scenario | None = None,
) -> list[PolicyResult]:
    """Each named policy's figures, in the order given; ``progress`` sees each as it is done.
    ``scenario``: ``inputs.scenario()`` when already built (used when the policies run in this process)."""
    check_names(names)
    if workers <= 1 or len(names) <= 1:
        scenario = scenario or inputs.scenario()
        results = []
        for name in names:
            results.append(replay(scenario, name, inputs.policy))
            if progress is not None:
                progress(results[-1])
        return results
    with ProcessPoolExecutor(max_workers=min(workers, len(names))) as pool:
        futures = [pool.submit(_replay_inputs, inputs, name) for name in names]
        done = []
        for future in futures:
            done.append(future.result())
            if progress is not None:
                progress(done[-1])
        return done
