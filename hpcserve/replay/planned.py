"""The planner-driven split policies: the service's rebalance planner (``plan_rebalance``) on the replay's
snapshot, told the demand ahead (its ``forecast`` argument) by one of three sources:

- reactive: the demand now (what is queued and running, replicas the autoscaler keeps), so the planner
  acts on the present only;
- predictive: ``forecast.forecast_demand``'s computation (EWMA level x time-of-day/week profile, peak over
  the policy's horizon): ``fit_rules`` then ``predict`` per side, except that the fitted models are
  reused for ``REFIT_S`` of sample time (fitting a week of samples is the costly part; a service would
  cache it too); the peak over the horizon is taken at every cycle;
- planner-foresight (an extra): the true future over the horizon, from the traces: for inference, the
  replicas the autoscaler keeps for the true peak rate (x GPUs per replica); for training, the demand now
  plus every job that will be submitted within the horizon. The planner's own margins still apply, so
  this is not the perfect-foresight reference (that is the oracle, ``policies.IdealSplit``): predictive
  against it is what the forecast alone costs.

History: the replay's demand samples (``SplitView.history``, one per ``sample_interval_s``; the figures
of ``planner.demand_now`` of a snapshot), the last 7 days of them, as the service loads them. The
planner's moves are carried out as it names them; its ``PlannerState`` is kept between cycles.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from hpcserve.config import Policy, SiteConfig
from hpcserve.rebalance.forecast import SeasonalModel, fit_rules, predict
from hpcserve.rebalance.planner import PlannerState, plan_rebalance
from hpcserve.rebalance.types import Demand
from hpcserve.replay.policies import SplitDecision, SplitView

HISTORY = timedelta(days=7)
REFIT_S = 1800.0  # the forecast's profile slot: within it, a refit changes little but the level
History = Sequence[tuple[datetime, Demand]]
DemandAhead = Callable[[SplitView, History], Demand]


def demand_now(view: SplitView, history: History) -> Demand:
    """Reactive: the present is all the planner is told."""
    return view.demand


@dataclass(slots=True)
class Forecaster:
    """Predictive: ``forecast_demand``'s two fitted models, refitted every ``REFIT_S`` of history."""

    policy: Policy
    seen: datetime | None = None  # the newest sample the models were fitted with
    models: tuple[SeasonalModel, SeasonalModel] | None = None

    def __call__(self, view: SplitView, history: History) -> Demand:
        rules = self.policy.rebalance
        newest = history[-1][0] if history else None
        if self.models is None or self.seen is None or (newest and _age(self.seen, newest) >= REFIT_S):
            training = [(at, d.training_gpus) for at, d in history]
            inference = [(at, d.inference_gpus) for at, d in history]
            self.models = (fit_rules(training, rules), fit_rules(inference, rules))
            self.seen = newest
        return Demand(
            training_gpus=predict(self.models[0], view.at, rules.horizon_s),
            inference_gpus=predict(self.models[1], view.at, rules.horizon_s),
        )


@dataclass(frozen=True, slots=True)
class Foresight:
    """Planner-foresight: the true demand over ``[now, now + horizon_s]``. ``inference_gpus(start, end)``
    is what the true load needs; ``arriving_gpus(start, end)`` the GPUs of the training jobs submitted in
    between."""

    inference_gpus: Callable[[float, float], float]
    arriving_gpus: Callable[[float, float], float]
    horizon_s: float

    def __call__(self, view: SplitView, history: History) -> Demand:
        end = view.now + self.horizon_s
        return Demand(
            training_gpus=view.demand.training_gpus + self.arriving_gpus(view.now, end),
            inference_gpus=self.inference_gpus(view.now, end),
        )


@dataclass(slots=True)
class PlannerPolicy:
    """The planner as a ``SplitPolicy`` of the replay, told the demand ahead by ``ahead``."""

    name: str
    policy: Policy
    site: SiteConfig
    ahead: DemandAhead
    state: PlannerState = field(default_factory=PlannerState)

    def decide(self, view: SplitView) -> SplitDecision:
        history = recent(view.history, view.at)
        forecast = self.ahead(view, history)
        plan, self.state = plan_rebalance(
            view.snapshot(), history, forecast, self.policy, self.site, view.at, self.state
        )
        return SplitDecision(moves=plan.moves, reasons=plan.reasons)


def recent(history: History, now: datetime) -> History:
    """The samples of the last ``HISTORY`` (the history is oldest first)."""
    return history[bisect.bisect_left(history, now - HISTORY, key=lambda sample: sample[0]) :]


def _age(since: datetime, now: datetime) -> float:
    return (now - since).total_seconds()
