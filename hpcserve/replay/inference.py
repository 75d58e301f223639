"""The inference side: one deployment's replicas on the inference nodes, scaled by the service's own
autoscaler (``hpcserve.serving.autoscaler.decide``), serving a fluid stream of requests.

The fluid model (an approximation, per ``step_s`` step rather than per request):
- the requests arriving in a step come from the rate curve (``RateCurve.per_step``);
- a ready replica admits up to ``mu`` requests per second, its saturated throughput under the engine
  simulator's latency model (``replica_throughput``, from ``enginesim.core.step_seconds``): with a full
  batch of M = ``max_num_seqs`` sequences each request costs the replica its prefill
  (prompt / prefill_tokens_per_s) plus output x step_seconds(M) / M of decode time;
- requests queue FIFO (engine queue, or the gateway's buffer while no replica is ready) in cohorts, one per
  arrival step; a cohort admitted k steps after it arrived waited k x ``step_s`` (so waits are counted to
  the step: 0 means admitted within the step it arrived in);
- with many slots (replicas x M) in use, random queueing below saturation is negligible, so requests only
  wait when the offered rate exceeds what the ready replicas admit;
- the autoscaler sees, per ready replica, its share of the queue and of the running requests: M each
  while requests queue (a ready replica fills its batch from the queue), else the requests admitted
  within the last service time M / mu (Little's law at a full batch's pace: what a replica's
  ``vllm:num_requests_running`` counts, not one step's admissions scaled up, whose noise is sqrt(M / mu
  / step_s) times larger); starting replicas show nothing.

Replicas: ``gpus_per_replica`` GPUs on one node, so a node holds G // gpus_per_replica of them, and only
on nodes of the inference side. A replica starts in phases: the autoscaler adds it and it waits for a
free slot (a pending Slurm job: Slurm's scheduling); on a node whose warm tier lacks the weights they are
copied from the cold tier first (``stage_s``, once per node: the copy is never evicted); then the engine
loads them (``startup_s``). A replica whose node leaves the inference side is relaunched (it stays
wanted, as the reconciler would do) and waits for a slot again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from hpcserve.enginesim.core import SimConfig, step_seconds
from hpcserve.placement import natural_key
from hpcserve.serving.autoscaler import DOWN_UTILIZATION, Observation, ReplicaLoad, ScalerState, decide
from hpcserve.serving.reconciler import ReplicaState
from hpcserve.serving.spec import DeploymentSpec


def replica_throughput(spec: DeploymentSpec, prompt_tokens: float, output_tokens: float) -> float:
    """Requests per second one replica completes with a full batch (see the module docstring)."""
    sim = spec.sim
    config = SimConfig(
        model=spec.model,
        max_batch=sim.max_num_seqs,
        prefill_tokens_per_s=sim.prefill_tokens_per_s,
        decode_s_per_token=sim.decode_ms_per_token / 1000,
    )
    decode = step_seconds(config, sim.max_num_seqs, 0)
    return 1.0 / (prompt_tokens / sim.prefill_tokens_per_s + output_tokens * decode / sim.max_num_seqs)


@dataclass(frozen=True, slots=True)
class ServingModel:
    """What the inference side needs to know about the deployment and the replay's clock."""

    spec: DeploymentSpec
    mu: float  # requests per second per ready replica
    per_node: int  # replicas per node
    step_s: float
    startup_s: float  # the engine's load, weights on the node's warm tier
    autoscale_every: int  # steps between autoscaler ticks
    at0: datetime  # the replay's time 0, for the autoscaler's clock
    stage_s: float = 0.0  # copying the weights from the cold tier to a node's warm tier (its first replica)

    def replicas_for(self, rate: float) -> int:
        """Replicas the autoscaler keeps for a steady ``rate`` (its scale-down utilization bound)."""
        return max(1, -int(-rate // (self.mu * DOWN_UTILIZATION)))


@dataclass(slots=True)
class Replica:
    index: int
    node: str | None = None  # None: waiting for a slot on an inference node
    ready_at: float | None = None

    def ready(self, now: float) -> bool:
        return self.ready_at is not None and self.ready_at <= now


@dataclass(slots=True)
class Waits:
    """Requests by how many steps they waited (a histogram of floats: the model is fluid)."""

    by_steps: dict[int, float] = field(default_factory=dict)

    def add(self, steps: int, count: float) -> None:
        if count > 0:
            self.by_steps[steps] = self.by_steps.get(steps, 0.0) + count

    @property
    def total(self) -> float:
        return sum(self.by_steps.values())

    def share_within(self, steps: float) -> float:
        total = self.total
        return sum(n for k, n in self.by_steps.items() if k <= steps) / total if total else 1.0

    def quantile(self, q: float) -> int:
        total, seen = self.total, 0.0
        for steps in sorted(self.by_steps):
            seen += self.by_steps[steps]
            if seen >= q * total:
                return steps
        return 0


class InferenceSide:
    """Replicas, the request queue and the autoscaler's state; advanced step by step by ``advance_to``."""

    def __init__(self, model: ServingModel, arrivals: Sequence[float], nodes: Sequence[str]) -> None:
        self.model, self.arrivals = model, arrivals
        self.nodes: dict[str, list[int]] = {}
        self.replicas: dict[int, Replica] = {}
        self.queue: deque[list[float]] = deque()  # [arrival step, requests]
        self.queued = 0.0
        service_s = model.spec.max_num_seqs / model.mu  # a request's time in a full batch
        steps = max(round(service_s / model.step_s), 1)
        self._admitted: deque[float] = deque([0.0] * steps, maxlen=steps)  # the last service time, per step
        self._admitted_sum = 0.0
        self._per_admitted = service_s / (steps * model.step_s)  # the whole steps to the service time
        self.step = 0
        self.state = ScalerState()
        self.wanted = 0
        self.waits = Waits()
        self.gpu_seconds = 0.0
        self._next_index = 0
        self._next_ready = float("inf")
        self._ready = self._placed = 0
        self.floor = 0  # replicas the autoscaler keeps at least (a pre-warm floor; 0: the spec's own)
        self.staged: set[str] = set()  # nodes whose warm tier holds the weights (never evicted)
        self._floored: dict[int, DeploymentSpec] = {}
        for node in sorted(nodes, key=natural_key):
            self.nodes[node] = []
        rate = max(self.arrivals[: max(round(60 / model.step_s), 1)], default=0.0) / model.step_s
        self.wanted = model.replicas_for(rate)  # what the first minute's load needs

    def warm_start(self) -> None:
        """Time 0: the replicas the first minute needs are ready where they fit, as if the service ran
        before the replay (the rest wait for a slot)."""
        for _ in range(self.wanted):
            self._add_replica()
        self._place(0.0)
        for replica in self.replicas.values():
            if replica.node is not None:
                replica.ready_at = 0.0
                self.staged.add(replica.node)
        self._refresh(0.0)

    @property
    def slots(self) -> int:
        return len(self.nodes) * self.model.per_node

    @property
    def now(self) -> float:
        return self.step * self.model.step_s

    def ready_count(self) -> int:
        now = self.now
        return sum(r.ready(now) for r in self.replicas.values())

    def placed_count(self) -> int:
        return sum(len(held) for held in self.nodes.values())

    def demand_gpus(self) -> int:
        """GPUs the deployment wants now: every replica the autoscaler keeps, placed or pending."""
        return self.wanted * self.model.spec.gpus_per_replica

    def advance_to(self, t: float) -> None:
        """Run every whole step that ends by ``t``."""
        step_s = self.model.step_s
        while (self.step + 1) * step_s <= t + 1e-9:
            self._tick()

    def _tick(self) -> None:
        now, step = self.now, self.step
        if step % self.model.autoscale_every == 0:
            self._autoscale(now)
        if self._next_ready <= now:
            self._refresh(now)
        self._serve(step, self.arrivals[step] if step < len(self.arrivals) else 0.0, self._ready)
        self.gpu_seconds += self._placed * self.model.spec.gpus_per_replica * self.model.step_s
        self.step += 1

    def _serve(self, step: int, arriving: float, ready: int) -> None:
        capacity = ready * self.model.mu * self.model.step_s
        if not self.queue and arriving <= capacity:
            self.waits.add(0, arriving)
            self._note_admitted(arriving)
            return
        self.queue.append([float(step), arriving])
        self.queued += arriving
        self._note_admitted(self._admit(step, capacity))

    def _note_admitted(self, admitted: float) -> None:
        self._admitted_sum = max(self._admitted_sum + admitted - self._admitted[0], 0.0)
        self._admitted.append(admitted)

    @property
    def running(self) -> float:
        """Requests in the replicas' batches: those admitted within the last service time."""
        return self._admitted_sum * self._per_admitted

    def _admit(self, step: int, capacity: float) -> float:
        admitted = 0.0
        while self.queue and capacity > 1e-12:
            cohort = self.queue[0]
            take = min(cohort[1], capacity)
            self.waits.add(step - int(cohort[0]), take)
            cohort[1] -= take
            capacity -= take
            admitted += take
            if cohort[1] <= 1e-12:
                self.queue.popleft()
        self.queued = max(self.queued - admitted, 0.0)
        return admitted

    def finish(self) -> None:
        """Count the requests still queued at the end with the wait they had so far."""
        for arrived, count in self.queue:
            self.waits.add(self.step - int(arrived), count)
        self.queue.clear()

    # --- the autoscaler ---------------------------------------------------------------------------

    def _autoscale(self, now: float) -> None:
        obs = self._observation(now)
        at = self.model.at0 + timedelta(seconds=now)
        decision, self.state = decide(self._spec(), obs, self.state, at)
        for index in decision.drain:
            self._drop_replica(index)
        for _ in range(decision.replicas - len(self.replicas)):
            self._add_replica()
        self.wanted = len(self.replicas)
        self._place(now)

    def _spec(self) -> DeploymentSpec:
        """The deployment with ``min_replicas`` raised to the pre-warm floor (within ``max_replicas``)."""
        spec = self.model.spec
        floor = min(self.floor, spec.max_replicas)
        if floor <= spec.min_replicas:
            return spec
        if floor not in self._floored:
            self._floored[floor] = spec.model_copy(update={"min_replicas": floor})
        return self._floored[floor]

    def pending_count(self) -> int:
        """Replicas waiting for a slot."""
        return sum(r.node is None for r in self.replicas.values())

    def empty_nodes(self) -> list[str]:
        return [node for node, held in self.nodes.items() if not held]

    def _observation(self, now: float) -> Observation:
        ready = sorted(i for i, r in self.replicas.items() if r.ready(now))
        starting = sorted(i for i, r in self.replicas.items() if not r.ready(now))
        queued, full = round(self.queued), len(ready) * self.model.spec.max_num_seqs
        waiting = _spread(queued, len(ready))
        running = _spread(full if queued else min(round(self.running), full), len(ready))
        loads = [
            ReplicaLoad(i, ReplicaState.READY, w, r, w + r)
            for i, w, r in zip(ready, waiting, running, strict=True)
        ]
        loads += [ReplicaLoad(i, ReplicaState.STARTING) for i in starting]
        rate = self.arrivals[self.step] / self.model.step_s if self.step < len(self.arrivals) else 0.0
        buffered = 0 if ready else round(self.queued)
        return Observation(tuple(sorted(loads, key=lambda r: r.index)), buffered, rate)

    def _add_replica(self) -> None:
        self.replicas[self._next_index] = Replica(self._next_index)
        self._next_index += 1

    def _drop_replica(self, index: int) -> None:
        replica = self.replicas.pop(index, None)
        if replica is not None and replica.node is not None:
            self.nodes[replica.node].remove(index)

    def _place(self, now: float) -> None:
        """Give pending replicas free slots (nodes in name order), each then starts: ``stage_s`` on a node
        whose warm tier lacks the weights, then ``startup_s``."""
        pending = [r for r in sorted(self.replicas.values(), key=lambda r: r.index) if r.node is None]
        for node, held in self.nodes.items():
            while pending and len(held) < self.model.per_node:
                replica = pending.pop(0)
                stage = 0.0 if node in self.staged else self.model.stage_s
                replica.node, replica.ready_at = node, now + stage + self.model.startup_s
                self.staged.add(node)
                held.append(replica.index)
        self._refresh(now)

    def _refresh(self, now: float) -> None:
        self._ready = sum(r.ready(now) for r in self.replicas.values())
        self._placed = self.placed_count()
        waiting = [r.ready_at for r in self.replicas.values() if r.ready_at is not None and r.ready_at > now]
        self._next_ready = min(waiting, default=float("inf"))

    # --- nodes ------------------------------------------------------------------------------------

    def add_node(self, node: str) -> None:
        self.nodes[node] = []
        self.nodes = dict(sorted(self.nodes.items(), key=lambda item: natural_key(item[0])))
        self._place(self.now)

    def remove_node(self, node: str) -> int:
        """Take ``node`` off the inference side; its replicas are relaunched (pending). Returns how many."""
        held = self.nodes.pop(node, [])
        for index in held:
            self.replicas[index].node = self.replicas[index].ready_at = None
        self._place(self.now)
        return len(held)

    def replicas_on(self, node: str) -> tuple[int, int]:
        """(ready, starting) replicas on ``node``."""
        now = self.now
        held = [self.replicas[i] for i in self.nodes.get(node, ())]
        ready = sum(r.ready(now) for r in held)
        return ready, len(held) - ready


def _spread(total: int, count: int) -> list[int]:
    """``total`` split over ``count`` parts as evenly as integers allow."""
    if count == 0:
        return []
    base, extra = divmod(max(total, 0), count)
    return [base + (i < extra) for i in range(count)]
