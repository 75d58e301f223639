"""The replay: one event heap drives the training side, node moves and the split policy; the inference
side advances in fixed steps up to each event's time.

Events at the same instant run in this order: the end of the warm-up (the figures start from zero), job
ends and kills, node arrivals, submissions, samples, rebalance ticks; then one scheduling pass. A node move:
- training -> inference: the node takes no new jobs; the jobs on it get their signal and are killed
  ``grace_s`` later (a preemption); once it is empty it arrives after ``move_delay_s``;
- inference -> training: its replicas are relaunched elsewhere (they stay wanted); it arrives after
  ``replica_drain_s`` (if it hosted any: its replicas finish their requests; a move's grace, if shorter,
  cuts that short) + ``move_delay_s``.
The policy's initial plan at time 0 is applied at once and is not counted as moves.
A decision that names moves (the planner's) is carried out as named, with the grace each move gives
(the whole grace for training jobs, as Slurm's preemption does; the executor ends a replica once its
requests are done, so replicas drain as on any move, within the grace);
invalid ones (a node outside the pool, or not on the move's source side) are skipped. A decision that
names a target count lets the replay pick the pool nodes: to inference, free nodes first, then those
whose jobs lose the least work; to training, nodes without replicas first.

An ``OverlapPolicy`` (``hpcserve.replay.overlap``) moves no node: every node starts on the training side
(both partitions span every node), and every ``lend_interval_s`` the replay lends: nodes whose replicas
are gone go back to training, the pre-warm floor is set, and each replica waiting for a slot gets an
idle node or one freed by preemption (the policy's victims, signalled, killed after the grace or after
their save, then the node is the replica's at once: no move delay).
"""

from __future__ import annotations

import heapq
import math
import time
from datetime import datetime, timedelta

from hpcserve.placement import natural_key
from hpcserve.rebalance.types import Demand, Side
from hpcserve.replay.floor import RECENT_S, FloorSource, FloorView
from hpcserve.replay.inference import InferenceSide, Waits
from hpcserve.replay.metrics import PolicyResult, training_figures
from hpcserve.replay.overlap import OverlapPolicy, gentle_victims, slurm_victims
from hpcserve.replay.policies import SplitDecision, SplitPolicy, SplitView
from hpcserve.replay.scenario import AT0, Scenario
from hpcserve.replay.snapshot import build_snapshot
from hpcserve.replay.traces import DAY_S
from hpcserve.replay.training import TrainingSide

WARMUP, END, KILL, ARRIVE, SUBMIT, SAMPLE, REBALANCE, LEND = range(8)
Event = tuple[float, int, int, str, int, int]  # (time, kind, sequence, node, job, run token)


class Replay:
    """One policy on one scenario; ``run`` once."""

    def __init__(self, scenario: Scenario, policy: SplitPolicy) -> None:
        s = self.scenario = scenario
        self.policy, self.settings = policy, s.settings
        self.lender = policy if isinstance(policy, OverlapPolicy) else None
        self.side: dict[str, Side] = dict(s.start_side)
        if self.lender is not None:  # overlapping partitions: every node is training's until lent
            self.side = dict.fromkeys(s.start_side, Side.TRAINING)
        self.delay = 0.0 if self.lender else self.settings.move_delay_s
        self.rates: list[tuple[datetime, float]] = []  # the deployment's busiest 10 s, per sample
        self.mean_rates: list[tuple[datetime, float]] = []  # its mean rate, per sample
        self._rate_step = 0
        self.transit: dict[str, Side] = {}  # moving nodes -> where they go
        self.training = TrainingSide(
            s.training.jobs, self._settled(Side.TRAINING), s.gpus, s.topology,
            checkpoint_s=self.settings.checkpoint_interval_s, depth=self.settings.backfill_depth, at0=AT0,
        )  # fmt: skip
        self.inference = InferenceSide(s.serving, s.arrivals, self._settled(Side.INFERENCE))
        self.history: list[tuple[datetime, Demand]] = []
        self.events: list[Event] = []
        self._seq = 0
        self.moves = 0
        self._clock = 0.0
        self.train_gpu_s = self.inference_node_s = 0.0

    def _settled(self, side: Side) -> list[str]:
        return [n for n, s in self.side.items() if s is side]

    def _push(self, at: float, kind: int, node: str = "", job: int = -1, token: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self.events, (at, kind, self._seq, node, job, token))

    # --- the loop ---------------------------------------------------------------------------------

    def run(self) -> PolicyResult:
        started = time.perf_counter()
        span = self.settings.span_s
        self._initial_split()
        if self.lender is not None:
            self._initial_lend()
            self._push(0.0, LEND)
        self.inference.warm_start()
        for job in self.scenario.training.jobs:
            self._push(job.submit, SUBMIT, job=job.id)
        self._push(0.0, SAMPLE)
        self._push(self.settings.rebalance_interval_s, REBALANCE)
        self._push(self.settings.warmup_s, WARMUP)
        while self.events and self.events[0][0] <= span:
            now = self.events[0][0]
            self._advance(now)
            while self.events and self.events[0][0] == now:
                self._handle(heapq.heappop(self.events))
            for start in self.training.schedule(now):
                self._push(start.end, END, job=start.job, token=start.token)
            self._moved_off_training(now)
        self._advance(span)
        self.inference.finish()
        return self._result(time.perf_counter() - started)

    def _advance(self, now: float) -> None:
        elapsed = now - self._clock
        self.train_gpu_s += self.training.busy_gpus * elapsed
        self.inference_node_s += len(self.inference.nodes) * elapsed
        self._clock = now
        self.inference.advance_to(now)

    def _handle(self, event: Event) -> None:
        now, kind, _, node, job, token = event
        if kind == WARMUP:
            self._reset_figures()
        elif kind == END:
            self.training.finish(job, token, now)
        elif kind == KILL:
            self.training.kill(job, now)
        elif kind == ARRIVE:
            self._arrive(node)
        elif kind == SUBMIT:
            self.training.submit(self.scenario.training.jobs[job], now)
        elif kind == SAMPLE:
            self.history.append((AT0 + timedelta(seconds=now), self._demand()))
            self._sample_rate(now)
            self._push(now + self.settings.sample_interval_s, SAMPLE)
        elif kind == LEND:
            self._lend(now)
            self._push(now + self.settings.autoscale_interval_s, LEND)
        else:
            view = self._view(now)
            self._apply(self.policy.decide(view), view)
            self._push(now + self.settings.rebalance_interval_s, REBALANCE)

    def _reset_figures(self) -> None:
        self.moves = 0
        self.train_gpu_s = self.inference_node_s = 0.0
        self.training.preemptions, self.training.lost_gpu_s = 0, 0.0
        self.inference.waits, self.inference.gpu_seconds = Waits(), 0.0

    # --- moves ------------------------------------------------------------------------------------

    def _initial_split(self) -> None:
        view = self._view(0.0)
        for node, _ in self._picks(self.policy.decide(view), view):
            dst = self.side[node].other
            if dst is Side.INFERENCE:
                self.training.take_node(node)
                self.training.pop_drained()
            else:
                self.inference.remove_node(node)
            self.side[node] = dst
            self._arrive_now(node, dst)

    def _apply(self, decision: SplitDecision, view: SplitView) -> None:
        for node, grace in self._picks(decision, view):
            self._move(node, self.side[node].other, view.now, grace)

    def _picks(self, decision: SplitDecision, view: SplitView) -> list[tuple[str, float | None]]:
        """The nodes to move and their grace: the decision's own moves that are valid now (with the grace
        they name), else the replay's choice (with the default grace)."""
        if decision.moves:
            managed = self.scenario.pool
            valid = [m for m in decision.moves if m.node in managed and self.side.get(m.node) is m.src]
            return [(m.node, float(m.grace_s) if m.preempt else None) for m in valid]
        if decision.inference_nodes is None:
            return []
        delta = view.clamp(decision.inference_nodes) - view.inference_nodes
        pool = self.scenario.pool_order
        if delta > 0:
            training = [n for n in pool if self.side.get(n) is Side.TRAINING]
            chosen = sorted(training, key=lambda n: self.training.loss_if_taken(n, view.now))[:delta]
        else:
            inference = [n for n in pool if self.side.get(n) is Side.INFERENCE]
            chosen = sorted(inference, key=self.inference.replicas_on)[:-delta]
        return [(node, None) for node in chosen]

    def _move(self, node: str, dst: Side, now: float, grace: float | None) -> None:
        """Start moving ``node``: its jobs get ``grace`` (the training class's by default) before they are
        killed; its replicas ``replica_drain_s`` (at most ``grace``) to finish their requests."""
        self.moves += self.lender is None
        del self.side[node]
        self.transit[node] = dst
        if dst is Side.INFERENCE:
            for job in self.training.take_node(node):
                self._push(now + (self.scenario.grace_s if grace is None else grace), KILL, job=job)
            return
        hosted = self.inference.remove_node(node)
        drain = self.settings.replica_drain_s if grace is None else min(grace, self.settings.replica_drain_s)
        self._push(now + (drain if hosted else 0.0) + self.delay, ARRIVE, node=node)

    def _moved_off_training(self, now: float) -> None:
        for node in self.training.pop_drained():
            self._push(now + self.delay, ARRIVE, node=node)

    # --- lending (overlapping partitions) ---------------------------------------------------------

    def _initial_lend(self) -> None:
        """Time 0: the replicas the first minute needs get the last nodes (all idle yet)."""
        count = self.scenario.replicas_to_nodes(self.inference.wanted)
        for node in list(reversed(self.scenario.nodes))[:count]:
            self.training.take_node(node)
            self.training.pop_drained()
            self.side[node] = Side.INFERENCE
            self.inference.add_node(node)

    def _lend(self, now: float) -> None:
        lender = self.lender
        assert lender is not None
        if lender.prewarm is not None:
            self.inference.floor = self._floor(now, lender.prewarm, lender.floor_load)
        pending = self.inference.pending_count()
        if not pending:
            for node in self.inference.empty_nodes():
                self._move(node, Side.TRAINING, now, 0.0)
            return
        coming = sum(d is Side.INFERENCE for d in self.transit.values()) * self.scenario.serving.per_node
        for _ in range(self.scenario.replicas_to_nodes(max(pending - coming, 0))):
            if not self._lend_one(now, lender):
                return

    def _floor(self, now: float, source: FloorSource, load: float) -> int:
        """The replicas for ``source``'s rate, each running at most ``load`` of its throughput (>= 1)."""
        step_s = self.settings.step_s
        step = min(int(now / step_s), len(self.scenario.arrivals))
        recent = self.scenario.arrivals[max(step - round(RECENT_S / step_s), 0) : step]
        view = FloorView(now, AT0 + timedelta(seconds=now), self.rates, self.mean_rates, recent, step_s)
        return max(1, math.ceil(source(view) / (self.scenario.serving.mu * load) - 1e-9))

    def _lend_one(self, now: float, lender: OverlapPolicy) -> bool:
        """Free one node for a waiting replica: an idle one, else the policy's victims'."""
        idle = [n for n, free in self.training.free.items() if free >= self.scenario.gpus[n]]
        if idle:
            self._move(max(idle, key=natural_key), Side.INFERENCE, now, 0.0)
            return True
        if lender.victims == "gentle":
            pick = gentle_victims(self.training, now, lender.spare_s)
        else:
            pick = slurm_victims(self.training, lender.victims)
        if pick is None:
            return False
        node, victims = pick
        self.training.signal(victims, now, save=lender.save_on_signal)
        grace = self.scenario.grace_s
        self._move(
            node,
            Side.INFERENCE,
            now,
            min(self.settings.checkpoint_save_s, grace) if lender.save_on_signal else grace,
        )
        return True

    def _sample_rate(self, now: float) -> None:
        """The deployment's request rate since the last sample, as the gateway would store it: the
        busiest ``slo_wait_s`` window's mean rate (a burst the SLO feels), not the interval's mean."""
        settings = self.settings
        step = min(int(now / settings.step_s), len(self.scenario.arrivals))
        if step > self._rate_step:
            width = max(round(settings.slo_wait_s / settings.step_s), 1)
            counts = self.scenario.arrivals[self._rate_step : step]
            peak = max(
                sum(counts[k : k + width]) / min(width, len(counts) - k) for k in range(0, len(counts), width)
            )
            at = AT0 + timedelta(seconds=now)
            self.rates.append((at, peak / settings.step_s))
            self.mean_rates.append((at, sum(counts) / (len(counts) * settings.step_s)))
            self._rate_step = step

    def _arrive(self, node: str) -> None:
        dst = self.transit.pop(node)
        self.side[node] = dst
        self._arrive_now(node, dst)

    def _arrive_now(self, node: str, dst: Side) -> None:
        if dst is Side.INFERENCE:
            self.inference.add_node(node)
        else:
            self.training.add_node(node)

    # --- what policies see ------------------------------------------------------------------------

    def _demand(self) -> Demand:
        training = self.training.busy_gpus + self.training.pending_gpus()
        return Demand(training_gpus=float(training), inference_gpus=float(self.inference.demand_gpus()))

    def _view(self, now: float) -> SplitView:
        s = self.scenario
        inference = len(self.inference.nodes) + sum(d is Side.INFERENCE for d in self.transit.values())
        return SplitView(
            now=now,
            at=AT0 + timedelta(seconds=now),
            inference_nodes=inference,
            min_inference_nodes=s.min_inference_nodes,
            max_inference_nodes=s.max_inference_nodes,
            gpus_per_node=s.gpus_per_node,
            demand=self._demand(),
            history=self.history,
            snapshot=lambda: build_snapshot(self, now),
        )

    # --- figures ----------------------------------------------------------------------------------

    def _result(self, wall_s: float) -> PolicyResult:
        settings, training = self.settings, self.training
        span, days = settings.days * DAY_S, settings.days
        train = training_figures(training.runs.values(), settings.span_s, since=settings.warmup_s)
        waits = self.inference.waits
        total_gpus = sum(self.scenario.gpus[n] for n in self.scenario.nodes)
        return PolicyResult(
            policy=self.policy.name, days=days, jobs=train.jobs, finished=train.finished,
            queue_mean_s=train.queue_mean_s, queue_p95_s=train.queue_p95_s, jct_mean_s=train.jct_mean_s,
            gpu_util=(self.train_gpu_s + self.inference.gpu_seconds) / (total_gpus * span),
            slo_attainment=waits.share_within(settings.slo_wait_s / settings.step_s),
            p99_wait_s=waits.quantile(0.99) * settings.step_s, requests=waits.total,
            moves=self.moves, moves_per_day=self.moves / days, preemptions=training.preemptions,
            lost_gpu_h=training.lost_gpu_s / 3600, mean_inference_nodes=self.inference_node_s / span,
            wall_s=wall_s,
        )  # fmt: skip
