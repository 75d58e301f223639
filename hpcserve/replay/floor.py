"""The pre-warm floor's sources (``lending: overlap``): the request rate the replicas should be ready for
one horizon ahead; the replay turns it into a replica floor (``OverlapPolicy.floor_load``) at every
lending tick. Each source sees a ``FloorView`` and returns a rate in requests per second.

- ``ForecastRate``: the product's forecast (``hpcserve.rebalance.forecast.fit`` + ``predict``, with the
  policy's ``prewarm:`` profile slot and half-life, no floor before ``min_history_s`` of history), fitted
  on the per-deployment rate sampled every ``sample_interval_s``, each sample the busiest 10 s since the
  last one (``bursts``; else the sample's mean), refitted every ``REFIT_S`` of samples on the last 7 days.
  The product fits the engines' running + waiting requests per controller tick instead of an arrival
  rate: the same signal by Little's law, sampled more densely.
- ``Ramp``: a source plus the ramp the recent arrivals show (``ramp``): a rise the seasonal forecast has
  not seen (a day busier than the ones before) is met while it rises, not once the autoscaler sees it.
- ``RiseRate`` (overlap-prewarm's): what the recent arrivals' busiest 10 s ask for now plus the rise the
  forecast expects over the horizon, the ramp, and, for bursty traffic, a standing share of the
  forecast peak (its class docstring says why each).
- ``TrueRate`` (the rate curve's true peak ahead) and ``TrueBursts`` (the true busiest 10 s ahead, from
  the replay's own arrivals, Poisson noise included): the references told the future.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise

from hpcserve.config.policy import PrewarmRules
from hpcserve.rebalance.forecast import SeasonalModel, fit, predict

RateHistory = Sequence[tuple[datetime, float]]  # (sample time, requests per second)
HISTORY = timedelta(days=7)
REFIT_S = 1800.0
RECENT_S = 300.0  # the recent arrivals a lending tick sees (``FloorView.recent``)
RAMP_PARTS = 3  # a ramp must rise over each of this many consecutive parts of the recent window


@dataclass(frozen=True, slots=True)
class FloorView:
    """What a pre-warm source sees at a lending tick."""

    now: float
    at: datetime
    rates: RateHistory  # the deployment's busiest-10-s request rate per sample, oldest first
    means: RateHistory  # its mean rate per sample
    recent: Sequence[float] = ()  # requests per step over the last ``RECENT_S``, oldest first
    step_s: float = 1.0


FloorSource = Callable[[FloorView], float]  # the peak request rate to have replicas for, one horizon ahead


@dataclass(slots=True)
class ForecastRate:
    """The forecast peak rate over ``horizon_s`` (module docstring)."""

    rules: PrewarmRules
    horizon_s: float
    bursts: bool = True  # forecast the busiest 10 s of each sample, else its mean
    seen: datetime | None = None
    model: SeasonalModel | None = None

    def __call__(self, view: FloorView) -> float:
        rates = view.rates if self.bursts else view.means
        if not rates or (rates[-1][0] - rates[0][0]).total_seconds() < self.rules.min_history_s:
            return 0.0
        newest = rates[-1][0]
        if self.model is None or self.seen is None or (newest - self.seen).total_seconds() >= REFIT_S:
            start = bisect.bisect_left(rates, newest - HISTORY, key=lambda sample: sample[0])
            self.model = fit(
                list(rates[start:]), slot_s=self.rules.profile_slot_s, halflife_s=self.rules.halflife_s
            )
            self.seen = newest
        return predict(self.model, view.at, self.horizon_s)


def ramp(recent: Sequence[float], step_s: float, ahead_s: float, parts: int = RAMP_PARTS) -> float:
    """The rate ``ahead_s`` after the window ``recent`` (requests per step, oldest first) if it keeps
    rising: the window is cut into ``parts`` equal parts, the rise is the smallest rise from one part's
    mean rate to the next (so one short burst is not a ramp: it must rise in every part), extrapolated
    from the last part's centre; a window that does not rise in every part gives its last part's mean.
    0 for a window shorter than ``parts`` steps."""
    size = len(recent) // parts
    if size == 0:
        return 0.0
    span = size * step_s
    tail = recent[len(recent) - parts * size :]
    means = [sum(tail[k * size : (k + 1) * size]) / span for k in range(parts)]
    rise = max(min(b - a for a, b in pairwise(means)), 0.0) if parts > 1 else 0.0
    return means[-1] + rise / span * (span / 2 + ahead_s)


@dataclass(frozen=True, slots=True)
class Ramp:
    """The larger of ``base``'s rate and the recent arrivals' ``ramp`` one horizon ahead."""

    base: FloorSource
    horizon_s: float

    def __call__(self, view: FloorView) -> float:
        return max(self.base(view), ramp(view.recent, view.step_s, self.horizon_s))


def busiest(recent: Sequence[float], step_s: float, block_s: float) -> float:
    """The busiest ``block_s`` block's mean rate in ``recent`` (requests per step); 0 when empty."""
    return max(block_rates(recent, step_s, block_s), default=0.0)


def burstiness(recent: Sequence[float], step_s: float, block_s: float) -> float:
    """How far the recent window's busiest ``block_s`` rises over its mean (busiest / mean; 1 when flat
    or empty): about 1.1 for Poisson arrivals at tens of requests per second, 3-5 for the Azure code
    trace's bursts."""
    mean = sum(recent) / (len(recent) * step_s) if recent else 0.0
    return busiest(recent, step_s, block_s) / mean if mean > 0 else 1.0


@dataclass(slots=True)
class RiseRate:
    """What runs now plus the rise the forecast expects, with a standing share of the forecast for bursty
    traffic: the largest of (the recent window's busiest ``block_s`` + the forecast's peak over the
    horizon minus its value now), the recent ``ramp``, and ``share`` x the forecast's peak x the
    burst weight. A forecast that is too high costs only its rise; a day busier than the forecast is met
    by what runs now and the ramp; bursts the recent window has not shown (one later in the slot) need
    the standing share, which only bursty traffic gets: the weight is (burstiness - 1) / (``burst_ref``
    - 1), clamped to [0, 1] (smooth traffic about 0.1, the Azure code trace 1)."""

    forecast: ForecastRate
    horizon_s: float
    share: float
    block_s: float = 10.0
    burst_ref: float = 2.0

    def __call__(self, view: FloorView) -> float:
        peak = self.forecast(view)
        rising = ramp(view.recent, view.step_s, self.horizon_s)
        model = self.forecast.model
        if model is None or peak <= 0:
            return max(peak, rising)
        rise = max(peak - predict(model, view.at, 0.0), 0.0)
        now = busiest(view.recent, view.step_s, self.block_s)
        weight = (burstiness(view.recent, view.step_s, self.block_s) - 1.0) / (self.burst_ref - 1.0)
        return max(now + rise, rising, self.share * peak * min(max(weight, 0.0), 1.0))


@dataclass(frozen=True, slots=True)
class TrueRate:
    """The true peak rate over ``horizon_s`` (``peak(start, end)``: the scenario's rate curve)."""

    peak: Callable[[float, float], float]
    horizon_s: float

    def __call__(self, view: FloorView) -> float:
        return self.peak(view.now, view.now + self.horizon_s)


def block_rates(arrivals: Sequence[float], step_s: float, block_s: float) -> array[float]:
    """The mean rate of each ``block_s`` block of ``arrivals`` (requests per step), in order."""
    size = max(round(block_s / step_s), 1)
    blocks = (arrivals[k : k + size] for k in range(0, len(arrivals), size))
    return array("d", (sum(block) / (len(block) * step_s) for block in blocks))


@dataclass(frozen=True, slots=True)
class TrueBursts:
    """The true busiest block (``block_rates``) over ``horizon_s``: what the arrivals will be."""

    rates: Sequence[float]
    block_s: float
    horizon_s: float

    def __call__(self, view: FloorView) -> float:
        first = int(view.now // self.block_s)
        last = int((view.now + self.horizon_s) // self.block_s)
        return max(self.rates[first : last + 1], default=0.0)
