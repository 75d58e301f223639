"""The autoscaler: one tick's view of a deployment -> how many replicas it should have, and which to drain.

``decide(spec, obs, state, now)`` is pure: no clock, no I/O. The caller keeps the returned ``ScalerState``
and passes it back on the next tick; the hysteresis lives there, in the open.

The rules, with T = ``target_waiting_per_replica``, the queue Q = engines' waiting + gateway-buffered
requests, R = requests the engines run, M = requests one replica runs at once (``spec.max_num_seqs``, or
less once a replica was seen queueing at T or more while running fewer):
- bounds first: below ``min_replicas`` go up to it, above ``max_replicas`` down to it, at once;
- the load asks for ceil((R + Q) / (0.9 M)) replicas: more once they run over 90% of their batches, so a
  rising load gets replicas before a queue builds up. While nothing runs yet (from zero, or no ready
  replica reports a request) the queue asks for ceil(Q / T) instead: nothing says yet what a replica
  takes. So a queue asks for about Q / (0.9 M) more replicas, what new ones run at once, not Q / T: with
  T much smaller than M, the backlog that built up during a long replica start used to ask a large
  deployment for many times the replicas its load needs (``max_replicas``);
- from zero, a buffered request starts replicas at once; else the excess must last
  ``scale_up_window_s``, and a queue that shrinks restarts that clock (the replicas there are drain it,
  e.g. the backlog of a start). Starting replicas count as capacity, and while any is starting no
  further replicas are added, so a queue that grows during a start does not over-provision;
- the load needs max(up, ceil((R + Q) / (0.8 M))) replicas, at least 1 while there is traffic.
  Only when that stayed below the current count for the whole ``scale_down_window_s`` does the count go
  down, to the most that was needed in the window (never below max(1, ``min_replicas``) this way);
- zero only with ``min_replicas`` 0 and ``idle_to_zero_s`` > 0, after that long with no request
  arriving, queued, running or in flight;
- ``floor`` (``lending: overlap``'s pre-warm, ``hpcserve.serving.prewarm``; 0 otherwise): the count never
  goes below it (within ``max_replicas``): desired = max(autoscaled, floor), so a forecast burst gets its
  replicas before it arrives, and nothing drains or scales to zero below it;
- no traffic never scales up (except to ``min_replicas`` or the floor). A scale-down drains starting
  replicas first, then ready ones with the fewest requests in flight: the executor stops routing to them
  and cancels each job once nothing is in flight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING

from hpcserve.serving.reconciler import ReplicaState

if TYPE_CHECKING:
    from hpcserve.serving.spec import DeploymentSpec

DOWN_UTILIZATION = 0.8  # a scale-down must leave the remaining replicas at most this full
UP_UTILIZATION = 0.9  # a scale-up comes once the replicas run more than this full


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """One replica this tick: its state, its engine's queue and batch, and the gateway's open requests."""

    index: int
    state: ReplicaState
    waiting: int = 0  # the engine's queue (vllm:num_requests_waiting)
    running: int = 0  # the engine's batch (vllm:num_requests_running)
    in_flight: int = 0  # requests and streams the gateway has open to it


@dataclass(frozen=True, slots=True)
class Observation:
    """A deployment at one tick: its replicas, what the gateway buffers for it, and recent arrivals."""

    replicas: tuple[ReplicaLoad, ...] = ()
    gateway_buffered: int = 0  # requests held at the gateway, e.g. while there is no ready replica
    arrival_rate: float | None = None  # requests per second recently, when the gateway measures it

    def of(self, state: ReplicaState) -> tuple[ReplicaLoad, ...]:
        return tuple(r for r in self.replicas if r.state is state)

    @property
    def active(self) -> tuple[ReplicaLoad, ...]:
        """Replicas that are or will be capacity: starting and ready (not draining)."""
        return tuple(r for r in self.replicas if r.state.counts_as_capacity)

    @property
    def queue(self) -> int:
        return sum(r.waiting for r in self.of(ReplicaState.READY)) + self.gateway_buffered

    @property
    def running(self) -> int:
        return sum(r.running for r in self.of(ReplicaState.READY))

    @property
    def has_traffic(self) -> bool:
        """Any request arriving, queued, running or in flight anywhere (draining replicas too)."""
        busy = any(r.waiting or r.running or r.in_flight for r in self.replicas)
        return busy or self.gateway_buffered > 0 or (self.arrival_rate or 0.0) > 0


@dataclass(frozen=True, slots=True)
class ScalerState:
    """What ``decide`` remembers between ticks (all explicit; start with ``ScalerState()``)."""

    above_since: datetime | None = None  # the load has asked for more replicas since then
    above_queue: int = 0  # the queue then (or at the last tick it shrank since)
    needed_at: tuple[datetime, ...] = ()  # [k - 1]: the last tick the load needed k replicas or more
    last_scale: datetime | None = None  # the last change of the count
    last_traffic: datetime | None = None  # the last tick with any request (first tick: that tick)
    seen_capacity: int | None = None  # requests a replica ran while its queue was at the target


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """The replica count to have (starting + ready), why, and which replicas to drain to get there."""

    replicas: int
    reason: str
    drain: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class _Need:
    up: int  # replicas the load asks for (the queue, while nothing runs)
    keep: int  # replicas the load needs (for scaling down)


def decide(
    spec: DeploymentSpec, obs: Observation, state: ScalerState, now: datetime, floor: int = 0
) -> tuple[ScaleDecision, ScalerState]:
    """The decision for this tick and the state to pass to the next one; ``floor``: the forecast's."""
    state = _remember(spec, obs, state, now)
    current = len(obs.active)
    need = _need(spec, obs, state)
    state = _track(obs, state, need, current, now)
    target, why = (
        _bounds(spec, current)
        or _to_zero(spec, obs, state, now, current)
        or _up(spec, obs, state, need, now, current)
        or _down(spec, state, now, current)
        or (current, _hold_reason(spec, obs, state, need, now, current))
    )
    target, why = _floored(spec, floor, target, why)
    if target == current:
        return ScaleDecision(current, why), state
    drain = _drain_order(obs, current - target) if target < current else ()
    moved = replace(state, above_since=None, last_scale=now)
    return ScaleDecision(target, f"{current} -> {target}: {why}", drain), moved


def _remember(spec: DeploymentSpec, obs: Observation, state: ScalerState, now: datetime) -> ScalerState:
    traffic = now if obs.has_traffic or state.last_traffic is None else state.last_traffic
    full = [
        r.running
        for r in obs.of(ReplicaState.READY)
        if r.running and r.waiting >= spec.target_waiting_per_replica
    ]
    return replace(state, last_traffic=traffic, seen_capacity=max(full) if full else state.seen_capacity)


def _need(spec: DeploymentSpec, obs: Observation, state: ScalerState) -> _Need:
    per_replica = min(spec.max_num_seqs, state.seen_capacity or spec.max_num_seqs)
    queue, load = obs.queue, obs.queue + obs.running
    if obs.running:
        up = math.ceil(load / (per_replica * UP_UTILIZATION))
    else:
        up = math.ceil(queue / spec.target_waiting_per_replica)
    keep = max(up, math.ceil(load / (per_replica * DOWN_UTILIZATION)), 1 if obs.has_traffic else 0)
    return _Need(up=min(up, spec.max_replicas), keep=min(keep, spec.max_replicas))


def _track(obs: Observation, state: ScalerState, need: _Need, current: int, now: datetime) -> ScalerState:
    """Start or stop the scale-up clock; stamp the counts the load needs now. Counts the state has no
    stamp for yet (a fresh state, replicas it did not start) are taken as needed now: a restarted
    controller waits a whole window before it scales down."""
    above = need.up > current and not obs.of(ReplicaState.STARTING)
    known = state.needed_at + (now,) * (current - len(state.needed_at))
    needed = tuple(now if k <= need.keep else at for k, at in enumerate(known, start=1))
    needed += (now,) * (need.keep - len(needed))
    if not above:
        return replace(state, above_since=None, above_queue=0, needed_at=needed)
    if state.above_since is None or obs.queue < state.above_queue:  # a shrinking queue: the clock restarts
        return replace(state, above_since=now, above_queue=obs.queue, needed_at=needed)
    return replace(state, needed_at=needed)


def _stable_need(spec: DeploymentSpec, state: ScalerState, now: datetime) -> int:
    """The most replicas the load needed within the last ``scale_down_window_s``."""
    window = spec.scale_down_window_s
    recent = [k for k, at in enumerate(state.needed_at, start=1) if _seconds(at, now) < window]
    return max(recent, default=0)


Step = tuple[int, str] | None


def _bounds(spec: DeploymentSpec, current: int) -> Step:
    if current < spec.min_replicas:
        return spec.min_replicas, f"min_replicas is {spec.min_replicas}"
    if current > spec.max_replicas:
        return spec.max_replicas, f"max_replicas is {spec.max_replicas}"
    return None


def _to_zero(spec: DeploymentSpec, obs: Observation, state: ScalerState, now: datetime, current: int) -> Step:
    if current == 0 or not spec.scales_to_zero or obs.has_traffic or state.last_traffic is None:
        return None
    idle = _seconds(state.last_traffic, now)
    return (0, f"no requests for {idle:.0f}s") if idle >= spec.idle_to_zero_s else None


def _floored(spec: DeploymentSpec, floor: int, target: int, why: str) -> tuple[int, str]:
    """``target`` raised to the forecast floor (itself capped at ``max_replicas``)."""
    floor = min(floor, spec.max_replicas)
    if target >= floor:
        return target, why
    return floor, f"forecast floor {floor} (pre-warm; {why})"


def _up(
    spec: DeploymentSpec, obs: Observation, state: ScalerState, need: _Need, now: datetime, current: int
) -> Step:
    if current == 0 and obs.has_traffic:
        return max(1, need.up), f"{obs.queue} requests waiting with no replica"
    if state.above_since is None or _seconds(state.above_since, now) < spec.scale_up_window_s:
        return None
    if not obs.running:
        return need.up, f"queue {obs.queue} above {spec.target_waiting_per_replica:g} per replica"
    load = obs.running + obs.queue
    return need.up, f"load {load} (queue {obs.queue}) over {UP_UTILIZATION:.0%} of what {current} run"


def _down(spec: DeploymentSpec, state: ScalerState, now: datetime, current: int) -> Step:
    target = max(_stable_need(spec, state, now), spec.min_replicas, 1)
    if target >= current:
        return None
    return target, f"at most {target} needed for {spec.scale_down_window_s:g}s"


def _hold_reason(
    spec: DeploymentSpec, obs: Observation, state: ScalerState, need: _Need, now: datetime, current: int
) -> str:
    starting = len(obs.of(ReplicaState.STARTING))
    if need.up > current and starting:
        return f"hold: queue {obs.queue}, waiting for {starting} starting replicas first"
    if state.above_since is not None:
        waited = _seconds(state.above_since, now)
        return (
            f"hold: load {obs.running + obs.queue} (queue {obs.queue}) above target for {waited:.0f}s of "
            f"{spec.scale_up_window_s:g}s"
        )
    if need.keep < current:
        since = state.needed_at[current - 1]
        waited = _seconds(since, now)
        return f"hold: {need.keep} would do, for {waited:.0f}s of {spec.scale_down_window_s:g}s"
    if current == 0:
        return "hold: no traffic"
    return f"hold: load fits (queue {obs.queue}, running {obs.running})"


def _drain_order(obs: Observation, count: int) -> tuple[int, ...]:
    """Starting replicas first (newest first), then ready ones with the fewest requests in flight."""
    order = sorted(
        obs.active,
        key=lambda r: (r.state is ReplicaState.READY, r.in_flight, r.running + r.waiting, -r.index),
    )
    return tuple(r.index for r in order[:count])


def _seconds(since: datetime, now: datetime) -> float:
    return (now - since).total_seconds()
