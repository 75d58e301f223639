"""Residency replay: per-model request arrivals over simulated replica jobs, under three ways of keeping
models resident, with the service's own decisions: ``serving.autoscaler.decide`` sizes every deployment
(or pool) on its load each tick, ``serving.tiers.decide_tier`` puts idle models to sleep.

Policies (``POLICIES``):
- per-model: one deployment per model, its own replica jobs, scale to zero after ``idle_to_zero_s``; a
  request at zero waits for a cold start (``residency_model`` says how it is modelled);
- tiers: the same, plus the warm tier: idle ``warm_after_s`` -> every engine of the model asleep (level 1,
  the job and its GPUs kept, so still counted in GPU-hours), woken by the next request (the modelled
  wake, ``enginesim.timing``); cold after ``idle_to_zero_s`` as before;
- tiers+pools: every model in one pool; each pool job runs one engine per model, at most K awake (what
  fits in GPU memory). A request goes, first match (the gateway's rule, ``serving.gateway.wake_choice``):
  to a job where its model is awake (the one with a free batch slot soonest), to one where it is waking,
  to the job with the most awake slots free now (engines going to sleep hold theirs until asleep), to
  one where a sleep under way frees a slot, else to the job whose least recently used awake model was
  used longest ago. There the replica agent's own rules decide
  (``serving.agent_rules``: ``next_moves`` for a wake, ``sleep_plan`` for an idle sleep), played in
  time: a wake into a free slot starts at once, even while another engine is going to sleep; with no
  slot free it waits for the first sleep under way that no earlier wake has taken, else the least
  recently used awake engine sleeps for it (after its requests finish, ``mode=wait``) and the model
  wakes once that sleep ends; wakes waiting for a slot take them first come first served; a model
  being woken is never put to sleep by an idle sleep; one going to sleep wakes once that sleep ends.
  An engine holds its GPU slot while awake, waking or going to sleep. The pool scales on the sum of its
  models' load, never below the controller's awake floor (``serving.pools.awake_floor``, the same
  function: ceil(models asked in the last ``idle_to_zero_s`` / K) jobs, its largest value over the last
  ``scale_down_window_s``), passed as ``decide``'s floor; idle models sleep after ``warm_after_s``; the
  pool goes to zero after ``idle_to_zero_s``;
- tiers+pools-no-floor (an ablation, not the product): the same on the summed load alone, which lets
  K x jobs fall below the models in use; each job's wakes, one at a time, then fall behind.

Requests go to ready jobs; to a starting one only while none is ready (the gateway holds them until it
is). A job's engine serves its requests as ``max_num_seqs`` batch slots (a request holds one from admission to
its last token, FIFO) and one prefill queue per job (the GPU's; requests held for a wake queue apart, so
that they do not block the awake models): TTFT = the wait for a slot, the job or the wake + the prefill
(prompt / prefill_tokens_per_s) + one decode step (``enginesim.core.step_seconds`` at the batch then).
A job holds its GPUs from its allocation (submit + the queue wait) until it ends: after a scale-down,
once its requests are done. The autoscaler ticks every ``tick_s``; a request to a deployment at zero
starts a job at once (the gateway buffers it). Counted requests: every one; "waited" = admission minus
arrival; a request is warm when its model had a running job but no awake engine at its arrival, cold when
it had no running job. Deterministic: no randomness here (the split of the trace is seeded).

Each wake is decided once, when its first request arrives, from what the job does then and has
decided before (``Job.views``: a wake that waits holds the slot of the sleep it waits for). One case
differs from the agent: an idle sleep that starts while a wake already waits, and ends first, frees its
slot for the next wake asked, where the agent gives it to the waiting one (first come first served);
the two wakes' times are swapped, not lengthened.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hpcserve.enginesim.core import SimConfig, step_seconds
from hpcserve.replay.metrics import percentile
from hpcserve.replay.residency_model import Request, ResidencySettings
from hpcserve.serving.agent_rules import EngineState, EngineView, next_moves, sleep_plan
from hpcserve.serving.autoscaler import Observation, ReplicaLoad, ScaleDecision, ScalerState, decide
from hpcserve.serving.pools import AwakeRule, AwakeState, awake_floor
from hpcserve.serving.reconciler import ReplicaState
from hpcserve.serving.spec import DeploymentSpec, Engine, SimulatorSettings
from hpcserve.serving.tiers import Tier, TierWindows, decide_tier

AT0 = datetime(2023, 11, 16, tzinfo=UTC)
WAIT_GOAL_S = 10.0
HOT, WARM, COLD = "hot", "warm", "cold"


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    tiers: bool  # idle models sleep after warm_after_s (their job kept)
    pooled: bool  # every model in one pool of jobs, K awake per job
    awake_floor: bool = True  # a pool is never below the controller's awake floor (False: an ablation)


POLICIES = (
    Policy("per-model", tiers=False, pooled=False),
    Policy("tiers", tiers=True, pooled=False),
    Policy("tiers+pools", tiers=True, pooled=True),
    Policy("tiers+pools-no-floor", tiers=True, pooled=True, awake_floor=False),
)


@dataclass(frozen=True, slots=True)
class ResidencyResult:
    """One policy's figures over the replay."""

    policy: str
    gpu_hours: float
    requests: int
    ttft_p50: float
    ttft_p99: float
    waited_over_10s: int
    warm_requests: int
    warm_ttft_p99: float
    cold_requests: int
    jobs_started: int
    wakes: int
    peak_jobs: int


class Job:
    """One replica job: its batch slots, prefill queue and engines: ``awake``, when each is or will be
    awake (a wake decided and under way or waiting for its slot), and ``sleeping``, when each engine
    going to sleep is asleep and whether a wake waits for its slot (it then holds that slot)."""

    __slots__ = ("active", "alloc", "awake", "busy_until", "held_free", "index", "last_used", "models",
                 "prefill_free", "ready", "sleeping", "slots", "stop")  # fmt: skip

    def __init__(self, index: int, submit: float, settings: ResidencySettings, models: Sequence[int],
                 awake: Sequence[int]) -> None:  # fmt: skip
        self.index, self.models = index, tuple(models)
        self.alloc = submit + settings.queue_wait_s
        self.ready = submit + settings.job_start_s(len(models), len(awake))
        self.slots = [0.0] * settings.max_num_seqs  # a heap of when each batch slot is free
        self.prefill_free = self.ready
        self.awake = dict.fromkeys(awake, self.ready)
        self.sleeping: dict[int, tuple[float, bool]] = {}  # model -> (asleep at, a wake took its slot)
        self.last_used = dict.fromkeys(awake, self.ready)
        self.busy_until: dict[int, float] = {}
        self.held_free: dict[int, float] = {}
        self.active: list[tuple[float, float, float]] = []  # (engine awake, admitted, last token)
        self.stop: float | None = None  # set once drained: when it ends

    def load(self, now: float) -> tuple[ReplicaLoad, int]:
        """What the autoscaler sees of this job at ``now``, and the requests the gateway holds for it
        (for a wake, or for the job to start): those are not in the engine's queue."""
        self.active = [entry for entry in self.active if entry[2] > now]
        held = sum(1 for awake, _, _ in self.active if awake > now)
        running = sum(1 for _, start, _ in self.active if start <= now)
        if self.stop is not None:
            state = ReplicaState.DRAINING
        else:
            state = ReplicaState.READY if self.ready <= now else ReplicaState.STARTING
        waiting = len(self.active) - running - held
        return ReplicaLoad(self.index, state, waiting, running, len(self.active)), held

    def views(self, at: float) -> dict[str, EngineView]:
        """The engines as the agent sees them at ``at`` (by model number): a decided wake holds a slot
        (waking), so does a sleep under way that no wake took (the one taken is that wake's slot)."""
        return {str(m): EngineView(m, self.state(m, at), self.last_used.get(m, 0.0)) for m in self.models}

    def state(self, model: int, at: float) -> EngineState:
        awake_at = self.awake.get(model)
        if awake_at is not None:
            return EngineState.AWAKE if awake_at <= at else EngineState.WAKING
        asleep_at, taken = self.sleeping.get(model, (0.0, True))
        return EngineState.SLEEPING if asleep_at > at and not taken else EngineState.ASLEEP

    def sleep(self, model: int, at: float, sleep_s: float, taken: bool) -> float:
        """Put the awake ``model`` to sleep from ``at`` (once its requests are done: ``mode=wait``); when
        it is asleep. ``taken``: a wake waits for this slot."""
        asleep_at = max(at, self.busy_until.get(model, 0.0), self.awake.pop(model)) + sleep_s
        self.sleeping[model] = (asleep_at, taken)
        return asleep_at


class Group:
    """A deployment (one model) or a pool (several): the jobs that serve its models, and its scaler."""

    def __init__(self, name: str, members: tuple[int, ...], settings: ResidencySettings, policy: Policy):
        self.members, self.max_awake = members, settings.max_awake if policy.pooled else 1
        self.spec = DeploymentSpec(
            name=name, model="sim/model-8b", served_model_name=name, engine=Engine.SIMULATOR,
            gpus_per_replica=settings.gpus_per_replica, max_replicas=settings.max_replicas,
            scale_up_window_s=settings.scale_up_window_s, scale_down_window_s=settings.scale_down_window_s,
            idle_to_zero_s=settings.idle_to_zero_s,
            warm_after_s=settings.warm_after_s if policy.tiers else None,
            simulator=SimulatorSettings(max_num_seqs=settings.max_num_seqs),
            pool=name if policy.pooled else None, pool_max_awake=self.max_awake,
        )  # fmt: skip
        self.windows = TierWindows.of(self.spec)
        self.awake_rule = AwakeRule.of(self.spec)
        self.state = ScalerState()
        self.jobs: list[Job] = []
        self.arrived = 0
        self.last_request: dict[int, float] = {}
        self.tiers: dict[int, Tier] = {}
        self.awake = AwakeState()  # the awake floor's state (``serving.pools.awake_floor``)

    def live(self) -> list[Job]:
        return [job for job in self.jobs if job.stop is None]


class ResidencyReplay:
    """``ResidencyReplay(settings, policy).run(requests, horizon_s)`` -> the policy's figures."""

    def __init__(self, settings: ResidencySettings, policy: Policy, warmup_s: float = 0.0) -> None:
        self.settings, self.policy, self.warmup_s = settings, policy, warmup_s
        config = SimConfig(
            model="sim", max_batch=settings.max_num_seqs, prefill_tokens_per_s=settings.prefill_tokens_per_s,
            decode_s_per_token=settings.decode_ms_per_token / 1000,
        )  # fmt: skip
        self.steps = [step_seconds(config, b, 0) for b in range(settings.max_num_seqs + 1)]
        everyone = tuple(range(settings.models))
        groups = [Group("pool", everyone, settings, policy)] if policy.pooled else [
            Group(f"model-{m}", (m,), settings, policy) for m in everyone
        ]  # fmt: skip
        self.groups = groups
        self.group_of = {m: g for g in groups for m in g.members}
        self.ttfts: list[float] = []
        self.warm_ttfts: list[float] = []
        self.waited = self.cold = self.started = self.wakes = self.peak = 0
        self.gpu_s = 0.0

    def run(self, requests: Sequence[Request], horizon_s: float) -> ResidencyResult:
        tick = 0.0
        for request in requests:
            while tick <= request.at:
                self._tick(tick)
                tick += self.settings.tick_s
            self._serve(request)
        while tick <= horizon_s:
            self._tick(tick)
            tick += self.settings.tick_s
        for group in self.groups:
            for job in group.jobs:
                self._account(job, horizon_s)
        return self._result()

    # --- the autoscaler's and the tiers' ticks -----------------------------------------------------------

    def _tick(self, now: float) -> None:
        for group in self.groups:
            self._scale(group, now, buffered=0)
            if self.policy.tiers:
                self._sleep_idle(group, now)
            group.arrived = 0
            for job in [j for j in group.jobs if j.stop is not None and j.stop <= now]:
                self._account(job, now)
                group.jobs.remove(job)

    def _scale(self, group: Group, now: float, buffered: int) -> None:
        seen = [job.load(now) for job in group.jobs]
        held = sum(count for _, count in seen)
        obs = Observation(tuple(r for r, _ in seen), held + buffered, group.arrived / self.settings.tick_s)
        at = AT0 + timedelta(seconds=now)
        decision, group.state = decide(group.spec, obs, group.state, at, self._floor(group, now))
        self._apply(group, decision, now)

    def _floor(self, group: Group, now: float) -> int:
        """A pool's awake floor (the controller's function), from each model's last request."""
        if not (self.policy.pooled and self.policy.awake_floor):
            return 0
        seen = {f"model-{m}": AT0 + timedelta(seconds=group.last_request[m]) if m in group.last_request
                else None for m in group.members}  # fmt: skip
        floor, group.awake = awake_floor(group.awake_rule, seen, group.awake, AT0 + timedelta(seconds=now))
        return floor

    def _apply(self, group: Group, decision: ScaleDecision, now: float) -> None:
        live = group.live()
        for _ in range(decision.replicas - len(live)):
            first = sorted(group.members, key=lambda m: -group.last_request.get(m, -1.0))
            index = max((j.index for j in group.jobs), default=-1) + 1
            group.jobs.append(Job(index, now, self.settings, group.members, first[: group.max_awake]))
            self.started += 1
        for job in live:
            if job.index in decision.drain:
                job.stop = max([now, *(f for _, _, f in job.active)])
        self.peak = max(self.peak, len(group.live()))

    def _sleep_idle(self, group: Group, now: float) -> None:
        """Each model whose tier is no longer hot sleeps on every job where it is awake."""
        at = AT0 + timedelta(seconds=now)
        for model, last in group.last_request.items():
            jobs = group.live()
            busy = any(job.busy_until.get(model, 0.0) > now for job in jobs)
            since = AT0 + timedelta(seconds=max([last, *(j.busy_until.get(model, 0.0) for j in jobs)]))
            current = group.tiers.get(model, Tier.HOT)
            tier = decide_tier(group.windows, current, since, at, demand=busy).tier
            group.tiers[model] = tier
            if tier is not Tier.HOT:
                for job in jobs:
                    self._sleep(job, model, now)

    def _sleep(self, job: Job, model: int, now: float) -> None:
        """The agent's idle sleep (``sleep_plan``): never a model being woken."""
        if job.awake.get(model, math.inf) > now:
            return  # not awake (a waking one is kept, as sleep_plan keeps it)
        for name in sleep_plan(job.views(now), str(model)).sleep:
            job.sleep(int(name), now, self.settings.sleep_s, taken=False)

    # --- one request -------------------------------------------------------------------------------------

    def _serve(self, request: Request) -> None:
        group = self.group_of[request.model]
        group.arrived += 1
        group.last_request[request.model] = request.at
        group.tiers[request.model] = Tier.HOT
        if not group.live():
            self._scale(group, request.at, buffered=1)
        live = group.live()
        kind = self._kind(live, request.model, request.at)
        ready = [job for job in live if job.ready <= request.at]
        job = self._choose(ready or live, request.model, request.at, group.max_awake)
        if request.model not in job.awake:
            self._wake(job, request.model, request.at, group.max_awake)
        ttft, waited = self._admit(job, request)
        if request.at < self.warmup_s:
            return
        self.ttfts.append(ttft)
        self.waited += waited > WAIT_GOAL_S
        if kind == WARM:
            self.warm_ttfts.append(ttft)
        self.cold += kind == COLD

    @staticmethod
    def _kind(live: Sequence[Job], model: int, now: float) -> str:
        running = [job for job in live if job.ready <= now]
        if any(job.awake.get(model, math.inf) <= now for job in running):
            return HOT
        return WARM if running else COLD

    @staticmethod
    def _choose(live: Sequence[Job], model: int, now: float, max_awake: int) -> Job:
        """The job for a request (the gateway's order, the module docstring's)."""
        awake = [job for job in live if job.awake.get(model, math.inf) <= now]
        if awake:
            return min(awake, key=lambda j: (j.slots[0], j.index))
        waking = [job for job in live if model in job.awake]
        if waking:
            return min(waking, key=lambda j: (j.awake[model], j.index))
        free = [job for job in live if _holding(job, now) < max_awake]
        if free:
            return min(free, key=lambda j: (_holding(j, now), j.index))
        freeing = [job for job in live if len(job.awake) < max_awake]  # a sleep under way frees a slot
        if freeing:
            return min(freeing, key=lambda j: (len(j.awake), j.index))
        with_awake = [job for job in live if job.awake]
        if with_awake:
            return min(with_awake, key=lambda j: (min(j.last_used[m] for m in j.awake), j.index))
        return min(live, key=lambda j: j.index)  # every slot going to sleep: the first, as the gateway

    def _wake(self, job: Job, model: int, now: float, max_awake: int) -> None:
        """Wake ``model`` on ``job``: when it starts is what the agent does (``wake_start``)."""
        end = wake_start(job, model, max(now, job.ready), max_awake, self.settings.sleep_s)
        end += self.settings.wake_s
        job.sleeping.pop(model, None)
        job.awake[model] = job.last_used[model] = end
        self.wakes += 1

    def _admit(self, job: Job, request: Request) -> tuple[float, float]:
        """Queue ``request`` on ``job``'s engine: (TTFT, wait before admission)."""
        model, at = request.model, request.at
        awake_at = job.awake[model]
        start = max(at, awake_at, heapq.heappop(job.slots))
        held = awake_at > at
        queue = job.held_free.get(model, 0.0) if held else job.prefill_free
        prefilled = max(start, queue) + request.prompt / self.settings.prefill_tokens_per_s
        if held:
            job.held_free[model] = prefilled
        else:
            job.prefill_free = prefilled
        step = self.steps[1 + sum(1 for free in job.slots if free > start)]
        finish = prefilled + max(request.output, 1) * step
        heapq.heappush(job.slots, finish)
        job.busy_until[model] = max(job.busy_until.get(model, 0.0), finish)
        job.last_used[model] = max(job.last_used.get(model, 0.0), finish)
        job.active.append((awake_at, start, finish))
        return prefilled + step - at, start - at

    # --- figures -----------------------------------------------------------------------------------------

    def _account(self, job: Job, end: float) -> None:
        stop = end if job.stop is None else min(job.stop, end)
        self.gpu_s += max(stop - max(job.alloc, self.warmup_s), 0.0) * self.settings.gpus_per_replica

    def _result(self) -> ResidencyResult:
        ttfts, warm = self.ttfts, self.warm_ttfts
        return ResidencyResult(
            self.policy.name, self.gpu_s / 3600, len(ttfts), percentile(ttfts, 0.5), percentile(ttfts, 0.99),
            self.waited, len(warm), percentile(warm, 0.99), self.cold, self.started, self.wakes, self.peak,
        )  # fmt: skip


def wake_start(job: Job, model: int, at: float, max_awake: int, sleep_s: float) -> float:
    """When the agent starts waking ``model`` on ``job``, asked at ``at``, by ``next_moves`` on the
    engines then: at once into a free slot; else once the first sleep under way that no wake took ends
    (it takes it), or once the engine ``next_moves`` puts to sleep for it is asleep. A model going to
    sleep itself waits for that sleep to end. With no move (every other slot waking) it asks again when
    the next wake or sleep ends, as the agent does."""
    name, own = str(model), job.sleeping.get(model, (0.0, True))[0]
    while True:
        views = job.views(at)
        moves = next_moves(views, max_awake, [name])
        if name in moves.wake:
            return max(at, own)
        victims = [int(v) for v, target in moves.sleep.items() if target == name]
        if victims:
            return max(job.sleep(victims[0], at, sleep_s, taken=True), own)
        free = sorted((job.sleeping[int(n)][0], int(n)) for n, e in views.items()
                      if e.state is EngineState.SLEEPING and n != name)  # fmt: skip
        if free and views[name].state is EngineState.ASLEEP:
            asleep_at, victim = free[0]
            job.sleeping[victim] = (asleep_at, True)
            return max(asleep_at, own)
        at = _next_change(job, at)


def _next_change(job: Job, at: float) -> float:
    """The next time a wake or a sleep on ``job`` ends after ``at``."""
    ends = [t for t in job.awake.values() if t > at] + [t for t, _ in job.sleeping.values() if t > at]
    if not ends:
        raise RuntimeError(f"job {job.index}: a wake with nothing under way to wait for at {at:.3f} s")
    return min(ends)


def replay(settings: ResidencySettings, policy: Policy, requests: Sequence[Request], horizon_s: float,
           warmup_s: float = 0.0) -> ResidencyResult:  # fmt: skip
    """One policy over ``requests`` (sorted by arrival) until ``horizon_s``; the figures leave out the
    requests before ``warmup_s`` and the GPU time before it (everything starts at zero replicas)."""
    return ResidencyReplay(settings, policy, warmup_s).run(requests, horizon_s)


def _holding(job: Job, now: float) -> int:
    """Engines holding GPU memory at ``now``, as the agent and the gateway count them: awake or waking,
    or still going to sleep (``agent_rules.HOLDS_GPU``)."""
    return len(job.awake) + sum(1 for asleep_at, _ in job.sleeping.values() if asleep_at > now)
