"""Pre-warm (``lending: overlap``): a deployment's replica floor one horizon ahead, from its history (pure).

The history is the deployment's load per controller tick: the requests its engines run and queue (the
engine samples' ``running + waiting``, summed over replicas) plus what the gateway buffers for it (the
``replica=None`` sample's ``gateway_waiting``). It is a count of requests in the system, not an arrival rate:
the gateway does not store per-deployment request counts, and by Little's law the concurrency is what a
replica's batch limit is measured against.

The forecast is the training side's (``hpcserve.rebalance.forecast``: EWMA level x time-of-day x day-of-week
profile), fitted on that series. ``prewarm_floor`` is ``floor_load`` (what runs now plus the forecast's rise
over ``[now, now + horizon]``, the recent ramp carried on, and for bursty traffic most of the forecast's
peak) divided by what one replica runs, rounded up: the floor rises one horizon before a predicted burst,
so the eviction (the victim's grace period) and the replica's start both end before the burst arrives.

The horizon (``prewarm_horizon_s``) is a documented estimate, not a measurement: the lending grace time
(``lending.grace_time_s``, what a victim gets to checkpoint) + the replica start (the policy's
``prewarm.start_estimate_s``: Slurm's scheduling, staging and the engine's load; ``serving.ready_timeout_s``
is its upper bound, used when it is smaller) + one controller tick.

The profile's resolution, the level's half-life and the history needed come from the policy's ``prewarm:``
section (``Forecasting``; the defaults below are its defaults). Limits: with less than ``min_history_s`` of
history there is no profile to trust and the floor is 0 (the autoscaler alone decides); the floor never
exceeds ``max_replicas`` (the autoscaler clamps it).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from hpcserve.rebalance.forecast import Sample, fit, predict, predict_at

if TYPE_CHECKING:
    from hpcserve.serving.spec import DeploymentSpec

MIN_HISTORY_S = 86_400.0  # one day: the daily profile needs a day to say when the burst comes
START_ESTIMATE_S = 300.0  # scheduling + staging + engine load of one replica, when nothing better is known
SLOT_S = 600  # the profile's resolution: 10 minutes
HALFLIFE_S = 1800.0  # the fast level forgets the present within about half an hour
RECENT_S = 300.0  # "now": the last five minutes of load
STANDING = 0.9  # the share of the forecast peak held for bursty traffic


@dataclass(frozen=True, slots=True)
class Forecasting:
    """How the load is forecast (the policy's ``prewarm:`` section, ``PrewarmRules``, supplies these)."""

    slot_s: int = SLOT_S
    halflife_s: float = HALFLIFE_S
    min_history_s: float = MIN_HISTORY_S


class LoadSample(Protocol):
    """An engine sample as the store keeps it (``hpcserve.store.EngineSample``)."""

    @property
    def at(self) -> datetime: ...
    @property
    def replica(self) -> int | None: ...
    @property
    def waiting(self) -> int | None: ...
    @property
    def running(self) -> int | None: ...
    @property
    def gateway_waiting(self) -> int | None: ...


def load_history(samples: Iterable[LoadSample]) -> list[Sample]:
    """The deployment's load per sampled instant (oldest first): engines' running + waiting, summed over
    replicas, plus the gateway's buffer."""
    load: dict[datetime, float] = defaultdict(float)
    for s in samples:
        if s.replica is None:
            load[s.at] += s.gateway_waiting or 0
        else:
            load[s.at] += (s.running or 0) + (s.waiting or 0)
    return sorted(load.items())


def prewarm_horizon_s(
    grace_s: float, ready_timeout_s: float, tick_s: float, start_estimate_s: float = START_ESTIMATE_S
) -> float:
    """How far ahead the floor looks: the victim's grace + the replica's start (estimated) + one tick."""
    return grace_s + min(start_estimate_s, ready_timeout_s) + tick_s


def per_replica_capacity(spec: DeploymentSpec, utilization: float) -> float:
    """Requests one replica runs at the autoscaler's scale-up utilisation (at least 1)."""
    return max(spec.max_num_seqs * utilization, 1.0)


def prewarm_floor(
    spec: DeploymentSpec,
    history: Sequence[Sample],
    now: datetime,
    horizon_s: float,
    per_replica_capacity: float,
    how: Forecasting = Forecasting(),
) -> int:
    """The replicas the load needs one horizon ahead (see ``floor_load``), at most ``spec.max_replicas``; 0
    without ``how.min_history_s`` of history."""
    if not history or (history[-1][0] - history[0][0]).total_seconds() < how.min_history_s:
        return 0
    need = floor_load(history, now, horizon_s, how)
    if need <= 0 or per_replica_capacity <= 0:
        return 0
    return min(math.ceil(need / per_replica_capacity - 1e-9), spec.max_replicas)


def floor_load(
    history: Sequence[Sample], now: datetime, horizon_s: float, how: Forecasting = Forecasting()
) -> float:
    """The load to pre-warm for: the largest of
    - what runs now (the busiest sample of the last ``RECENT_S``) plus the rise the forecast expects over
      the horizon (its peak ahead over its value now);
    - the recent ramp carried on: when each third of the last ``RECENT_S`` rose over the one before, the
      smaller rise, extrapolated over the horizon;
    - ``STANDING`` of the forecast's peak, for bursty traffic only: weighted by how far the recent busiest
      sample stands over the recent mean (full at twice it). Bursts that land anywhere in a profile slot
      need it; smooth traffic does not, and would only hold idle replicas.
    The rule the simulator measured against Slurm's own preemption (``scripts/bench/rebalance``: ``RiseRate``
    in ``hpcserve.replay.floor``)."""
    model = fit(history, slot_s=how.slot_s, halflife_s=how.halflife_s)
    peak = predict(model, now, horizon_s, "peak")
    recent = [value for at, value in history if 0 <= (now - at).total_seconds() <= RECENT_S]
    busiest = max(recent, default=0.0)
    rise = max(peak - predict_at(model, now), 0.0)
    mean = sum(recent) / len(recent) if recent else 0.0
    weight = min(max(busiest / mean - 1.0, 0.0), 1.0) if mean > 0 else 0.0
    return max(busiest + rise, _ramp(history, now, horizon_s), STANDING * peak * weight)


def _ramp(history: Sequence[Sample], now: datetime, horizon_s: float) -> float:
    """The last third's mean plus the recent rise per second carried over half a third and the horizon;
    0 unless each third of the last ``RECENT_S`` has samples and rose."""
    part = RECENT_S / 3
    means = []
    for k in (3, 2, 1):  # oldest third first
        values = [v for at, v in history if (k - 1) * part <= (now - at).total_seconds() < k * part]
        if not values:
            return 0.0
        means.append(sum(values) / len(values))
    per_s = max(min(means[1] - means[0], means[2] - means[1]), 0.0) / part
    return means[2] + per_s * (part / 2 + horizon_s) if per_s > 0 else 0.0
