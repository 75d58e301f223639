"""Demand forecast: an EWMA level times a time-of-day and day-of-week profile, fitted from history.

The model is multiplicative, ``value(t) ~ level(t) * daily[slot(t)] * weekly[weekday(t)]``:
- ``daily``: each sample is divided by the mean of its own day (so a busy week does not bend the shape);
  a slot's factor is the median over days of that day's mean ratio in the slot (robust to outages and
  spikes), scaled so the factors average 1. Slots no sample fell in get 1.
- ``weekly``: each weekday's mean over the overall mean, shrunk towards 1 by ``n / (n + weekly_prior_days)``
  where n is how many such weekdays the history holds: one Monday says little about Mondays.
- ``level``: two EWMAs of the deseasonalised samples ``value / (daily * weekly)``, weighted by time, not by
  sample count (the sampler's ticks are irregular): a sample ``dt`` after the previous one gets weight
  ``1 - 0.5 ** (dt / halflife)``. The fast one (``halflife_s``) says where demand is now, the slow one
  (``baseline_halflife_s``) where it usually is. Ahead of the last sample the forecast's level drifts from
  the fast one to the slow one with the fast one's half-life: the next hour follows the present, tomorrow
  follows the days before.

Slots and weekdays are read in each datetime's own time zone (UTC for the snapshot's times), so a site
whose day follows local time sees its profile shifted by the offset, which changes nothing but the labels.
A history with a mean of zero (or none at all) has a flat profile; a negative sample counts as zero.

``predict(model, now, horizon_s)`` gives the peak (default) or the mean over ``[now, now + horizon_s]``;
the planner wants the peak, so nodes are in place before the burst, not half-way through it.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from itertools import pairwise
from typing import TYPE_CHECKING, Literal, Protocol

from hpcserve.model.rebalance import Demand

if TYPE_CHECKING:
    from hpcserve.config.policy import RebalanceRules

DAY_S = 86_400
MIN_FACTOR = 0.05  # a profile factor never falls below this: a quiet slot still gets some demand

Sample = tuple[datetime, float]
DemandHistory = Sequence[tuple[datetime, Demand]]
"""Demand per side over time, oldest first, e.g. ``planner.demand_now`` of each sampled snapshot."""

Aggregate = Literal["peak", "mean"]
Day = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class SeasonalModel:
    """A fitted forecast: both levels as of ``last``, and the profile (each factor list averages 1)."""

    level: float  # the fast EWMA: where the deseasonalised demand is now
    baseline: float  # the slow EWMA: where it settles once the present is forgotten
    halflife_s: float  # how fast the forecast forgets the present, ahead of ``last``
    daily: tuple[float, ...]  # one factor per slot of the day
    weekly: tuple[float, ...]  # one factor per weekday, Monday first
    last: datetime | None = None  # the newest sample's time; None for an empty history

    @property
    def slot_s(self) -> int:
        return DAY_S // len(self.daily)

    def factor(self, at: datetime) -> float:
        """The profile's factor at ``at``."""
        return self.daily[_seconds_of_day(at) // self.slot_s] * self.weekly[at.weekday()]


def fit(
    history: Sequence[Sample],
    *,
    slot_s: int = 1800,
    halflife_s: float = 3600.0,
    baseline_halflife_s: float = DAY_S,
    weekly_prior_days: float = 2.0,
) -> SeasonalModel:
    """Fit the profile and both levels on ``history`` ((time, value), oldest first)."""
    if slot_s <= 0 or DAY_S % slot_s:
        raise ValueError(f"slot_s={slot_s} does not divide a day ({DAY_S} s)")
    samples = [(at, max(value, 0.0)) for at, value in history]
    days = _by_day(samples)
    daily, weekly = _daily_profile(days, slot_s), _weekly_profile(days, weekly_prior_days)
    shape = SeasonalModel(0.0, 0.0, halflife_s, daily, weekly)
    flat = [(at, value / shape.factor(at)) for at, value in samples]
    level, last = _ewma(flat, halflife_s)
    baseline, _ = _ewma(flat, baseline_halflife_s)
    return replace(shape, level=level, baseline=baseline, last=last)


def predict_at(model: SeasonalModel, at: datetime) -> float:
    """The forecast at one instant."""
    ahead = max((at - model.last).total_seconds(), 0.0) if model.last else 0.0
    memory = 0.5 ** (ahead / model.halflife_s) if model.halflife_s > 0 else 0.0
    level = model.baseline + (model.level - model.baseline) * memory
    return level * model.factor(at)


def predict(model: SeasonalModel, now: datetime, horizon_s: float, how: Aggregate = "peak") -> float:
    """The peak (or time-weighted mean) of the forecast over ``[now, now + horizon_s]``, sampled at ``now``
    and at every slot boundary inside (the profile is constant within a slot; the level moves slowly)."""
    points = _slot_edges(now, horizon_s, model.slot_s)
    if how == "peak":
        return max(predict_at(model, at) for at in points[:-1])
    span = (points[-1] - now).total_seconds()  # the horizon, to the microsecond datetimes keep
    if span <= 0:
        return predict_at(model, now)
    return sum(predict_at(model, a) * (b - a).total_seconds() for a, b in pairwise(points)) / span


def ewma_level(history: Sequence[Sample], halflife_s: float) -> float:
    """The plain time-weighted EWMA of the values, without a profile (a baseline to compare with)."""
    return _ewma([(at, max(value, 0.0)) for at, value in history], halflife_s)[0]


def fit_rules(history: Sequence[Sample], rules: RebalanceRules) -> SeasonalModel:
    """``fit`` with the policy's forecast settings."""
    return fit(
        history,
        slot_s=rules.profile_slot_s,
        halflife_s=rules.ewma_halflife_s,
        baseline_halflife_s=rules.baseline_halflife_s,
    )


def forecast_demand(history: DemandHistory, now: datetime, rules: RebalanceRules) -> Demand:
    """Each side's forecast peak over the policy's horizon, one model per side fitted on ``history``."""
    training = [(at, d.training_gpus) for at, d in history]
    inference = [(at, d.inference_gpus) for at, d in history]
    return Demand(
        training_gpus=predict(fit_rules(training, rules), now, rules.horizon_s),
        inference_gpus=predict(fit_rules(inference, rules), now, rules.horizon_s),
    )


def recent_peak(history: DemandHistory, now: datetime, window_s: float) -> Demand:
    """The largest demand per side within the last ``window_s`` seconds of ``history`` (zero if none)."""
    since = now - timedelta(seconds=window_s)
    recent = [d for at, d in history if since <= at <= now]
    return Demand(
        training_gpus=max((d.training_gpus for d in recent), default=0.0),
        inference_gpus=max((d.inference_gpus for d in recent), default=0.0),
    )


class PartitionSample(Protocol):
    """A queue sample of one partition at one tick (``hpcserve.store.QueueSample`` fits)."""

    @property
    def at(self) -> datetime: ...
    @property
    def partition(self) -> str: ...
    @property
    def pending_gpus(self) -> int: ...
    @property
    def running_gpus(self) -> int: ...


def demand_history(samples: Iterable[PartitionSample], training: str, inference: str) -> DemandHistory:
    """Queue samples -> the demand history: per tick, pending + running GPUs of the ``training`` and the
    ``inference`` partition (0 for a partition the tick has no sample of), oldest first."""
    ticks: dict[datetime, dict[str, float]] = defaultdict(dict)
    for sample in samples:
        ticks[sample.at][sample.partition] = float(sample.pending_gpus + sample.running_gpus)
    return [
        (at, Demand(parts.get(training, 0.0), parts.get(inference, 0.0)))
        for at, parts in sorted(ticks.items())
    ]


def _seconds_of_day(at: datetime) -> int:
    return at.hour * 3600 + at.minute * 60 + at.second


def _by_day(samples: Iterable[Sample]) -> dict[Day, list[Sample]]:
    days: dict[Day, list[Sample]] = defaultdict(list)
    for at, value in samples:
        days[(at.year, at.month, at.day)].append((at, value))
    return days


def _daily_profile(days: dict[Day, list[Sample]], slot_s: int) -> tuple[float, ...]:
    ratios: dict[int, list[float]] = defaultdict(list)
    for samples in days.values():
        mean = _mean(v for _, v in samples)
        if mean <= 0:
            continue
        per_slot: dict[int, list[float]] = defaultdict(list)
        for at, value in samples:
            per_slot[_seconds_of_day(at) // slot_s].append(value / mean)
        for slot, values in per_slot.items():
            ratios[slot].append(_mean(values))
    slots = range(DAY_S // slot_s)
    return _normalised([statistics.median(ratios[s]) if ratios[s] else 1.0 for s in slots])


def _weekly_profile(days: dict[Day, list[Sample]], prior_days: float) -> tuple[float, ...]:
    overall = _mean(v for samples in days.values() for _, v in samples)
    if overall <= 0:
        return (1.0,) * 7
    seen: dict[int, list[float]] = defaultdict(list)
    for samples in days.values():
        seen[samples[0][0].weekday()].append(_mean(v for _, v in samples) / overall)
    return _normalised([_shrunk(seen[weekday], prior_days) for weekday in range(7)])


def _shrunk(ratios: list[float], prior: float) -> float:
    """The mean of ``ratios``, pulled towards 1 as if ``prior`` more ratios of 1 had been seen."""
    return (sum(ratios) + prior) / (len(ratios) + prior) if ratios or prior else 1.0


def _normalised(factors: list[float]) -> tuple[float, ...]:
    """Scaled to mean 1, then floored at ``MIN_FACTOR``."""
    mean = _mean(factors)
    if mean <= 0:
        return (1.0,) * len(factors)
    return tuple(max(f / mean, MIN_FACTOR) for f in factors)


def _ewma(samples: Sequence[Sample], halflife_s: float) -> tuple[float, datetime | None]:
    """The time-weighted EWMA of ``samples`` and the newest sample's time."""
    if not samples:
        return 0.0, None
    level, last = samples[0][1], samples[0][0]
    for at, value in samples[1:]:
        dt = max((at - last).total_seconds(), 0.0)
        weight = 1.0 - 0.5 ** (dt / halflife_s) if halflife_s > 0 else 1.0
        level += weight * (value - level)
        last = max(last, at)
    return level, last


def _slot_edges(now: datetime, horizon_s: float, slot_s: int) -> list[datetime]:
    """``now``, every slot boundary strictly inside the horizon, and its end."""
    horizon_s = max(horizon_s, 0.0)
    first = slot_s - _seconds_of_day(now) % slot_s - now.microsecond / 1e6
    count = max(math.ceil((horizon_s - first) / slot_s), 0)
    offsets = [first + k * slot_s for k in range(count)]
    inside = [s for s in offsets if 0 < s < horizon_s]
    return [now + timedelta(seconds=s) for s in (0.0, *inside, horizon_s)]


def _mean(values: Iterable[float]) -> float:
    items = list(values)
    return sum(items) / len(items) if items else 0.0
