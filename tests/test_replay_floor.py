"""The simulator's pre-warm floor (hpcserve/replay/floor.py) and the lending bound: the ramp a window of
arrivals shows, the true busiest blocks ahead, the product's forecast settings and history rule, the
floor's load factor, the cost-free replay the bound runs on, and a replica's start in phases."""

from __future__ import annotations

from datetime import timedelta

import pytest

from hpcserve.config.policy import PrewarmRules
from hpcserve.rebalance.forecast import SeasonalModel
from hpcserve.replay.compare import cost_free, make_policy, replay
from hpcserve.replay.engine import Replay
from hpcserve.replay.floor import (
    FloorView,
    ForecastRate,
    Ramp,
    RiseRate,
    TrueBursts,
    block_rates,
    burstiness,
    ramp,
)
from hpcserve.replay.inference import InferenceSide
from hpcserve.replay.overlap import OverlapPolicy
from hpcserve.replay.scenario import AT0, default_policy
from hpcserve.serving.autoscaler import UP_UTILIZATION
from tests.test_replay import burst_inference, flat_inference, job, scenario_with, tiny_site


def view(now: float = 0.0, recent: tuple[float, ...] = (), rates: list[float] | None = None) -> FloorView:
    history = [(AT0 + timedelta(seconds=300 * k), rate) for k, rate in enumerate(rates or [])]
    at = history[-1][0] if history else AT0 + timedelta(seconds=now)
    return FloorView(now, at, history, history, recent, 1.0)


def test_a_steady_ramp_is_extrapolated_one_horizon_ahead() -> None:
    """Rates 10, 11, ..., 39 per step over 30 s: the last third's mean is 34.5 at its centre, rising 10
    per 10 s: 100 s past the window's end (105 s past that centre) it reaches 34.5 + 105."""
    recent = [10.0 + k for k in range(30)]
    assert ramp(recent, 1.0, 100.0) == pytest.approx(34.5 + 105.0)


def test_one_short_burst_or_a_fall_is_not_a_ramp() -> None:
    flat_then_burst = [10.0] * 20 + [40.0] * 10  # rises only into the last third
    assert ramp(flat_then_burst, 1.0, 100.0) == pytest.approx(40.0)
    falling = [40.0 - k for k in range(30)]
    assert ramp(falling, 1.0, 100.0) == pytest.approx(sum(falling[-10:]) / 10)
    assert ramp([5.0], 1.0, 100.0) == 0.0


def test_ramp_source_takes_the_larger_of_its_base_and_the_ramp() -> None:
    rising = tuple(10.0 + k for k in range(30))
    source = Ramp(lambda _: 50.0, 100.0)
    assert source(view(recent=rising)) == pytest.approx(139.5)
    assert source(view(recent=(10.0,) * 30)) == 50.0


def test_true_bursts_are_the_busiest_block_within_the_horizon() -> None:
    arrivals = [1.0] * 30 + [5.0] * 5 + [1.0] * 25  # 60 steps of 1 s; a 5-s burst at 30-35 s
    rates = block_rates(arrivals, 1.0, 10.0)
    assert list(rates) == [1.0, 1.0, 1.0, 3.0, 1.0, 1.0]
    source = TrueBursts(rates, 10.0, 15.0)
    assert source(view(now=12.0)) == 1.0  # blocks 1 and 2 (10-29 s)
    assert source(view(now=20.0)) == 3.0  # blocks 2 and 3 (20-39 s)
    assert source(view(now=55.0)) == 1.0  # past the end: the last block only


def test_the_forecast_uses_the_policy_prewarm_settings_and_needs_its_history() -> None:
    """No floor (0) before ``min_history_s`` of samples; then the forecast of a flat history is flat."""
    rules = PrewarmRules(min_history_s=3600)
    source = ForecastRate(rules, horizon_s=600.0)
    assert source(view(rates=[20.0] * 12)) == 0.0  # 55 minutes of samples
    assert source(view(rates=[20.0] * 13)) == pytest.approx(20.0)
    assert source.model is not None and source.model.slot_s == rules.profile_slot_s
    assert source.model.halflife_s == rules.halflife_s


def test_the_floor_runs_each_replica_at_most_floor_load_full() -> None:
    scenario = scenario_with([], flat_inference())
    mu = scenario.serving.mu
    for load, rate, floor in ((UP_UTILIZATION, 2.7 * mu, 3), (0.5, 2.7 * mu, 6), (1.0, 3.0 * mu, 3)):
        source = TrueBursts([rate], 10.0, 10.0)
        policy = OverlapPolicy("floor", victims="gentle", prewarm=source, floor_load=load)
        assert Replay(scenario, policy)._floor(0.0, source, load) == floor
    assert OverlapPolicy("default").floor_load == UP_UTILIZATION  # the product's per-replica capacity


def test_the_lending_bound_replays_without_start_grace_or_lost_work() -> None:
    """Six 1-node jobs fill what two warm replicas leave; the rate triples at 2000 s. The bound's replicas
    are ready once placed and its victims lose nothing; hpcserve's default loses their saves."""
    jobs = [job(i, 100.0 * i, 1, 20_000.0) for i in range(6)]
    scenario = scenario_with(jobs, burst_inference(2000.0), checkpoint_interval_s=600.0, inference_peak=0.5)
    free = cost_free(scenario)
    assert free.serving.startup_s == 0.0 and free.grace_s == 0.0 and free.settings.checkpoint_save_s == 0.0
    assert free.serving.spec.scale_down_window_s == 0.0 and scenario.serving.startup_s > 0
    policy = make_policy("lending-bound", scenario, default_policy(tiny_site()))
    assert isinstance(policy, OverlapPolicy) and policy.floor_load == 1.0
    bound = replay(scenario, "lending-bound", default_policy(tiny_site()))
    ours = replay(scenario, "overlap-prewarm", default_policy(tiny_site()))
    assert bound.preemptions >= 1 and bound.lost_gpu_h == 0.0 and bound.slo_attainment == 1.0
    assert ours.lost_gpu_h > 0.0
    assert bound.queue_mean_s <= ours.queue_mean_s


def test_a_replica_stages_the_weights_on_a_node_once_then_loads_them() -> None:
    """Phases: a node's first replica waits ``stage_s`` (cold -> warm tier) and then ``startup_s``; a
    replica started there again later only ``startup_s``; the warm start's nodes count as staged."""
    scenario = scenario_with([], flat_inference(), replica_stage_s=60.0, replica_startup_s=180.0)
    serving = scenario.serving
    assert serving.stage_s == 60.0 and serving.startup_s == 180.0
    side = InferenceSide(serving, scenario.arrivals, ["i1"])
    side.warm_start()
    assert side.staged == {"i1"}
    side._add_replica()  # pending: i1 holds one replica
    side.advance_to(100.0)
    side.add_node("i2")
    fresh = next(r for r in side.replicas.values() if r.node == "i2")
    assert fresh.ready_at == 100.0 + 60.0 + 180.0
    side.advance_to(500.0)
    side.remove_node("i2")
    side.add_node("i2")
    assert fresh.node == "i2" and fresh.ready_at == 500.0 + 180.0


def test_rise_rate_is_what_runs_now_plus_the_forecast_rise_or_a_share_of_the_forecast() -> None:
    """A forecast of 10 that doubles at 00:10 (a horizon of 15 minutes from 00:00 sees 20, a rise of 10).
    Smooth arrivals of 5 per second: 5 + the rise = 15 (no standing share: burstiness 1). Bursty ones
    (5 requests in the last 5 s of 5 minutes: busiest 10 s 0.5, 30 times the mean): 0.5 + 10 is below
    the standing 0.9 x 20 = 18. Busier smooth arrivals (12): 12 + 10."""
    daily = tuple(2.0 if k == 1 else 1.0 for k in range(144))
    model = SeasonalModel(10.0, 10.0, 1800.0, daily, (1.0,) * 7, last=AT0)
    forecast = ForecastRate(PrewarmRules(min_history_s=0), horizon_s=900.0, model=model, seen=AT0)
    rates = [(AT0, 10.0)]

    def rise(recent: tuple[float, ...], share: float = 0.9) -> float:
        return RiseRate(forecast, 900.0, share=share)(FloorView(0.0, AT0, rates, rates, recent, 1.0))

    assert burstiness((5.0,) * 300, 1.0, 10.0) == 1.0
    assert rise((5.0,) * 300) == pytest.approx(15.0)
    bursty = (0.0,) * 295 + (1.0,) * 5
    assert burstiness(bursty, 1.0, 10.0) == pytest.approx(30.0)
    assert rise(bursty) == pytest.approx(18.0)
    assert rise(bursty, share=0.5) == pytest.approx(10.5)
    assert rise((12.0,) * 300) == pytest.approx(22.0)
    no_history = ForecastRate(PrewarmRules(), 900.0)  # a day needed: no forecast, the ramp alone
    view = FloorView(0.0, AT0, rates, rates, (12.0,) * 300, 1.0)
    assert RiseRate(no_history, 900.0, 0.9)(view) == pytest.approx(12.0)
