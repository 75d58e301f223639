"""Pre-warm (lending: overlap): the load history, the forecast floor one horizon ahead of a daily burst, and
the autoscaler's floor input."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from hpcserve.config.policy import PrewarmRules
from hpcserve.serving.autoscaler import Observation, ReplicaLoad, ScalerState, decide
from hpcserve.serving.prewarm import (
    SLOT_S,
    Forecasting,
    floor_load,
    load_history,
    per_replica_capacity,
    prewarm_floor,
    prewarm_horizon_s,
)
from hpcserve.serving.reconciler import ReplicaState
from hpcserve.serving.spec import DeploymentSpec, build_deployment

DAY0 = datetime(2026, 11, 16, tzinfo=UTC)  # a Monday
BURST_H = 14  # every day, 14:00-15:00, the load jumps from 5 to 80 requests
HORIZON_S = 1800.0


def make_spec(**values: Any) -> DeploymentSpec:
    base = {"name": "d", "model": "m", "engine": "simulator", "gpus_per_replica": 0, "max_replicas": 8}
    return build_deployment({**base, "simulator": {"max_num_seqs": 10}, **values})


SPEC = make_spec()


def load_at(at: datetime) -> float:
    return 80.0 if at.hour == BURST_H else 5.0


def daily_burst(days: int, step_s: int = 300) -> list[tuple[datetime, float]]:
    count = days * 86_400 // step_s
    return [(DAY0 + timedelta(seconds=k * step_s), load_at(DAY0 + timedelta(seconds=k * step_s)))
            for k in range(count)]  # fmt: skip


def floor_at(history: list[tuple[datetime, float]], now: datetime) -> int:
    past = [(at, v) for at, v in history if at < now]
    return prewarm_floor(SPEC, past, now, HORIZON_S, per_replica_capacity(SPEC, 0.9))


def test_floor_rises_one_horizon_before_the_burst() -> None:
    history = daily_burst(8)
    burst = DAY0 + timedelta(days=7, hours=BURST_H)
    quiet = floor_at(history, burst - timedelta(hours=3))
    ahead = floor_at(history, burst - timedelta(seconds=HORIZON_S - 60))
    too_early = floor_at(history, burst - timedelta(seconds=HORIZON_S + 700))
    assert quiet <= 1
    assert too_early <= 1
    assert ahead >= 8 * 0.8  # the burst needs ceil(80 / 9) = 9, capped at max_replicas 8; the forecast ~ it
    after = floor_at(history, burst + timedelta(hours=2))
    assert after <= 1


def test_no_floor_without_a_day_of_history() -> None:
    history = daily_burst(1)[:-20]
    assert floor_at(history, DAY0 + timedelta(hours=BURST_H - 0.25)) == 0
    assert prewarm_floor(SPEC, [], DAY0, HORIZON_S, 9.0) == 0


def test_floor_is_capped_at_max_replicas() -> None:
    history = [(at, v * 10) for at, v in daily_burst(3)]
    now = DAY0 + timedelta(days=2, hours=BURST_H, minutes=-10)
    assert prewarm_floor(SPEC, [h for h in history if h[0] < now], now, HORIZON_S, 9.0) == SPEC.max_replicas


@dataclass(frozen=True)
class S:
    at: datetime
    replica: int | None
    waiting: int | None = None
    running: int | None = None
    gateway_waiting: int | None = None


def test_load_history_sums_engines_and_the_gateway_per_instant() -> None:
    t1 = DAY0 + timedelta(seconds=2)
    samples = [S(DAY0, None, gateway_waiting=3), S(DAY0, 0, 2, 5), S(DAY0, 1, None, 4), S(t1, 0, 0, 1)]
    assert load_history(samples) == [(DAY0, 14.0), (t1, 1.0)]


def test_horizon_is_grace_plus_start_plus_a_tick() -> None:
    assert prewarm_horizon_s(120, 900, 2) == 120 + 300 + 2
    assert prewarm_horizon_s(120, 60, 2) == 120 + 60 + 2  # the ready timeout bounds the start estimate


def obs(*loads: tuple[int, int]) -> Observation:
    ready = ReplicaState.READY
    return Observation(tuple(ReplicaLoad(i, ready, w, r, w + r) for i, (w, r) in enumerate(loads)))


def test_floor_raises_the_desired_count_without_load() -> None:
    decision, _ = decide(SPEC, obs((0, 1)), ScalerState(), DAY0, floor=4)
    assert decision.replicas == 4
    assert "forecast floor" in decision.reason


def test_floor_is_ignored_below_the_autoscaled_count_and_capped() -> None:
    busy = obs((20, 10), (20, 10))
    start = ScalerState(above_since=DAY0 - timedelta(seconds=60), above_queue=40)
    unfloored, _ = decide(SPEC, busy, start, DAY0)
    floored, _ = decide(SPEC, busy, start, DAY0, floor=1)
    assert floored.replicas == unfloored.replicas
    capped, _ = decide(SPEC, obs((0, 1)), ScalerState(), DAY0, floor=50)
    assert capped.replicas == SPEC.max_replicas


def test_floor_blocks_scale_to_zero_and_down() -> None:
    spec = make_spec(min_replicas=0, idle_to_zero_s=60)
    state = ScalerState(last_traffic=DAY0 - timedelta(hours=1))
    down, _ = decide(spec, obs((0, 0), (0, 0)), state, DAY0)
    kept, _ = decide(spec, obs((0, 0), (0, 0)), state, DAY0, floor=2)
    assert down.replicas == 0
    assert kept.replicas == 2 and kept.drain == ()


def test_no_floor_is_the_autoscaler_as_before() -> None:
    for o in (obs(), obs((0, 1)), obs((30, 10))):
        assert decide(SPEC, o, ScalerState(), DAY0) == decide(SPEC, o, ScalerState(), DAY0, floor=0)


def test_the_policys_profile_slot_sets_when_the_floor_rises() -> None:
    """A one-minute profile (the policy's ``prewarm.profile_slot_s``) sees a burst the 10-minute default
    averages away, and the floor rises one horizon before that minute, not before its 10-minute slot."""
    burst_at = DAY0 + timedelta(hours=BURST_H, minutes=7)
    history = [
        (DAY0 + timedelta(seconds=k * 60), 80.0 if (k % 1440) == BURST_H * 60 + 7 else 5.0)
        for k in range(2 * 1440)
    ]
    minute = Forecasting(slot_s=60, halflife_s=1800.0, min_history_s=86_400.0)
    now = burst_at + timedelta(days=1)  # the history runs on past it: load is seen up to now
    past = [h for h in history if h[0] < now - timedelta(seconds=90)]
    cap = per_replica_capacity(SPEC, 0.9)
    assert prewarm_floor(SPEC, past, now - timedelta(seconds=90), 60.0, cap, minute) == 1  # not yet in sight
    assert prewarm_floor(SPEC, past, now - timedelta(seconds=30), 60.0, cap, minute) >= 5  # one horizon ahead
    assert prewarm_floor(SPEC, past, now - timedelta(seconds=30), 60.0, cap) == 1  # 10-min slot: no rise seen
    short = Forecasting(slot_s=60, halflife_s=1800.0, min_history_s=3 * 86_400.0)
    assert prewarm_floor(SPEC, past, now - timedelta(seconds=30), 60.0, cap, short) == 0  # too little history


def test_the_policys_prewarm_section_is_checked() -> None:
    assert PrewarmRules().profile_slot_s == SLOT_S
    with pytest.raises(ValueError, match="profile_slot_s"):
        PrewarmRules(profile_slot_s=7)
    with pytest.raises(ValueError, match="extra"):
        PrewarmRules.model_validate({"slot": 60})
    assert prewarm_horizon_s(10, 900, 1, start_estimate_s=40) == 10 + 40 + 1


def test_the_floor_follows_a_ramp_and_holds_more_for_bursty_traffic() -> None:
    """What runs now, a ramp carried on over the horizon, and (bursty traffic only) most of the forecast's
    peak: the rule the simulator measured against Slurm's preemption."""
    flat = daily_burst(2, step_s=60)
    now = DAY0 + timedelta(days=1, hours=9)  # quiet hours, load 5
    past = [h for h in flat if h[0] < now]
    assert floor_load(past, now, 300.0) == pytest.approx(5.0)  # smooth, no rise: what runs now
    rising = [(at, v + max(0.0, 300 - (now - at).total_seconds()) / 10) for at, v in past]  # +6/min
    assert floor_load(rising, now, 300.0) > 35.0  # ~35 now, and still rising over the horizon
    spike = now - timedelta(seconds=120)
    spiky = [(at, 40.0 if at == spike else v) for at, v in past]  # one busy minute in the last five
    assert floor_load(spiky, now, 300.0) >= 40.0
