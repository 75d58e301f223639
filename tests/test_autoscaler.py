"""The autoscaler: each rule on its own, properties over random ticks, and a replay of a real burst."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcserve.serving.autoscaler import Observation, ReplicaLoad, ScaleDecision, ScalerState, decide
from hpcserve.serving.reconciler import ReplicaState
from hpcserve.serving.spec import DeploymentSpec, build_deployment
from tests.conftest import TRACES

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
READY, STARTING, DRAINING = ReplicaState.READY, ReplicaState.STARTING, ReplicaState.DRAINING


def make_spec(**values: Any) -> DeploymentSpec:
    base = {"name": "d", "model": "m", "engine": "simulator", "gpus_per_replica": 0, "max_replicas": 8}
    return build_deployment({**base, "simulator": {"max_num_seqs": 10}, **values})


SPEC = make_spec()  # T = 4 waiting per replica, M = 10 running; windows 10 s up, 300 s down, 600 s to zero


def ready(*loads: tuple[int, int] | tuple[int, int, int], first: int = 0) -> tuple[ReplicaLoad, ...]:
    """Ready replicas from (waiting, running[, in_flight]); in_flight defaults to waiting + running."""
    return tuple(
        ReplicaLoad(first + i, READY, load[0], load[1], load[2] if len(load) == 3 else load[0] + load[1])
        for i, load in enumerate(loads)
    )


def starting(count: int, first: int) -> tuple[ReplicaLoad, ...]:
    return tuple(ReplicaLoad(first + i, STARTING) for i in range(count))


def obs(*replicas: ReplicaLoad, buffered: int = 0, rate: float | None = None) -> Observation:
    return Observation(tuple(replicas), buffered, rate)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def run(
    spec: DeploymentSpec, ticks: Iterable[tuple[float, Observation]], state: ScalerState | None = None
) -> tuple[list[ScaleDecision], ScalerState]:
    """Decide at each (second, observation); the state carries over."""
    state, out = state or ScalerState(), []
    for second, seen in ticks:
        decision, state = decide(spec, seen, state, at(second))
        out.append(decision)
    return out, state


def steady(seen: Observation, seconds: Iterable[float]) -> list[tuple[float, Observation]]:
    return [(s, seen) for s in seconds]


# --- each rule ---------------------------------------------------------------------------------------


def test_no_traffic_never_scales_up_even_with_room() -> None:
    decisions, _ = run(make_spec(max_replicas=50), steady(obs(), range(0, 3000, 7)))
    assert {d.replicas for d in decisions} == {0}
    assert decisions[0].reason == "hold: no traffic"


def test_a_buffered_request_starts_replicas_at_once() -> None:
    (first,), _ = run(SPEC, [(0, obs(buffered=1))])
    assert first.replicas == 1 and "with no replica" in first.reason
    (burst,), _ = run(SPEC, [(0, obs(buffered=10))])
    assert burst.replicas == 3  # ceil(10 / 4)


def test_bounds_come_first() -> None:
    (up,), _ = run(make_spec(min_replicas=2), [(0, obs())])
    assert up.replicas == 2 and "min_replicas" in up.reason
    (down,), _ = run(make_spec(max_replicas=2), [(0, obs(*ready((0, 5), (0, 0), (0, 1))))])
    assert (down.replicas, down.drain) == (2, (1,))


def test_scale_up_once_the_queue_stayed_above_target_for_the_window() -> None:
    queued = obs(*ready((12, 10)))  # one replica, 12 waiting: the queue asks for ceil(12 / 4) = 3
    decisions, _ = run(SPEC, steady(queued, [0, 5, 9, 10]))
    assert [d.replicas for d in decisions] == [1, 1, 1, 3]
    assert "above target for 5s of 10s" in decisions[1].reason


def test_a_short_spike_does_not_scale_up() -> None:
    ticks = [(0, obs(*ready((12, 10)))), (5, obs(*ready((0, 10)))), (9, obs(*ready((12, 10))))]
    ticks.append((12, obs(*ready((12, 10)))))
    decisions, _ = run(SPEC, ticks)
    assert [d.replicas for d in decisions] == [1, 1, 1, 1]


def test_starting_replicas_count_and_hold_further_scale_ups() -> None:
    growing = [(s, obs(*ready((20 + 5 * s, 10)), *starting(2, 1))) for s in range(0, 60, 5)]
    decisions, state = run(SPEC, growing)
    assert {d.replicas for d in decisions} == {3}  # the queue grows while they start: no more added
    assert "waiting for 2 starting replicas" in decisions[-1].reason and state.above_since is None
    now_ready = obs(*ready((40, 10), (40, 10), (40, 10)))
    later, _ = run(SPEC, steady(now_ready, [60, 69, 70]), state)  # then the window starts again
    assert [d.replicas for d in later] == [3, 3, 8]


def test_a_busy_replica_scales_up_before_a_queue_builds() -> None:
    """Running over 90% of its batch asks for more replicas, queue or not (10 of M = 10 here)."""
    decisions, _ = run(SPEC, steady(obs(*ready((0, 10))), [0, 5, 10]))
    assert [d.replicas for d in decisions] == [1, 1, 2] and "over 90%" in decisions[-1].reason
    calm, _ = run(SPEC, steady(obs(*ready((0, 9))), [0, 5, 10, 20]))  # 9 of 10 fits
    assert {d.replicas for d in calm} == {1}


def test_a_shrinking_queue_restarts_the_scale_up_clock() -> None:
    """Two full replicas drain their queue (20, 15, 10, 5 waiting each): the replicas there are take care
    of it. Once it stops shrinking for the window, the load gets more."""
    queues = {0: 20, 5: 15, 10: 10, 15: 5, 20: 5, 25: 5}
    ticks = [(s, obs(*ready((q, 10), (q, 10)))) for s, q in queues.items()]
    decisions, _ = run(SPEC, ticks)
    assert [d.replicas for d in decisions] == [2, 2, 2, 2, 2, 4]  # (20 + 10) / 9 -> 4 at 25 s


def test_a_burst_on_a_small_full_replica_scales_up_at_once() -> None:
    """The real cluster's burst test: M = 2, T = 2, no scale-up window; one replica runs 2 with 3 waiting."""
    spec = make_spec(max_replicas=3, target_waiting_per_replica=2, scale_up_window_s=0,
                     simulator={"max_num_seqs": 2})  # fmt: skip
    (decision,), _ = run(spec, [(0, obs(*ready((3, 2))))])
    assert decision.replicas == 3  # (2 + 3) / (0.9 x 2)


def serve_rate(
    spec: DeploymentSpec, rates: Sequence[float], service_s: float, startup_s: int, first: int
) -> tuple[list[int], list[float]]:
    """A fluid deployment, second by second: ``rates[t]`` requests arrive; a ready replica runs up to M at
    once, each for ``service_s``; the rest queue. The autoscaler ticks every 10 s; new replicas are ready
    ``startup_s`` later. Returns the replica count and the queue per tick."""
    per_replica, ready_at = spec.max_num_seqs, [0] * first
    queue = running = 0.0
    state, counts, queues = ScalerState(), [], []
    for second, rate in enumerate(rates):
        live = sum(t <= second for t in ready_at)
        running -= min(running, live * per_replica) / service_s
        take = min(queue + rate, live * per_replica - running)
        running, queue = running + take, queue + rate - take
        if second % 10:
            continue
        waiting, busy = _spread_int(round(queue), live), _spread_int(round(running), live)
        loads = [ReplicaLoad(i, READY, waiting[i], busy[i]) for i in range(live)]
        seen = obs(*loads, *starting(len(ready_at) - live, live))
        decision, state = decide(spec, seen, state, at(second))
        ready_at = (ready_at + [second + startup_s] * decision.replicas)[: decision.replicas]
        counts.append(decision.replicas)
        queues.append(queue)
    return counts, queues


def _spread_int(total: int, count: int) -> list[int]:
    base, extra = divmod(total, count) if count else (0, 0)
    return [base + (i < extra) for i in range(count)]


def test_the_backlog_of_a_long_start_does_not_ask_for_max_replicas() -> None:
    """A large deployment: M = 32, 8 s a request (4 req/s a replica), 180 s starts, up to 32 replicas.
    Its rate steps from 30 to 50 req/s on 10 replicas: 50 req/s keep 16 at 80% (13 at 100%). Sizing the
    queue by T (ceil(Q / 4)) asked for all 32 at once, and the backlog built during the start asked for
    them again; now the load asks for what it needs and the replicas drain the backlog."""
    spec = make_spec(max_replicas=32, min_replicas=1, simulator={"max_num_seqs": 32})
    counts, queues = serve_rate(spec, [30.0] * 60 + [50.0] * 1740, service_s=8.0, startup_s=180, first=10)
    assert counts[:6] == [10] * 6 and max(counts[6:9]) > 10  # up within 30 s of the step
    changes = [b for a, b in pairwise(counts) if a != b]
    assert changes == [17, 16]  # one step up (its backlog counted at 90%), then down to what it keeps
    assert queues[-1] == 0  # the 17 drained the backlog of the start


def test_scale_down_waits_for_the_whole_window() -> None:
    calm = obs(*ready((0, 3), (0, 2), (0, 0)))  # 5 running: one replica would do
    decisions, _ = run(SPEC, steady(calm, range(0, 301, 10)))
    assert [d.replicas for d in decisions[:-1]] == [3] * 30
    assert decisions[-1].replicas == 1 and decisions[-1].drain == (2, 1)
    assert "would do, for 290s of 300s" in decisions[-2].reason


def test_scale_down_goes_to_the_most_needed_in_the_window() -> None:
    loads = {0: [9, 9, 0], 100: [6, 6, 0]}  # 18 running: 3 replicas needed; 12 running: 2 needed
    live, state, changes = [0, 1, 2], ScalerState(), []
    for second in range(0, 700, 50):
        running = loads.get(second, [1, 0, 0])
        seen = obs(*(ReplicaLoad(i, READY, 0, running[i], running[i]) for i in live))
        decision, state = decide(SPEC, seen, state, at(second))
        live = [i for i in live if i not in decision.drain]
        if decision.drain:
            changes.append((second, decision.replicas))
    assert changes == [(300, 2), (400, 1)]  # 300 s after the last tick 3 were needed, then 2


def test_drain_prefers_starting_then_idle_replicas() -> None:
    mixed = obs(*ready((0, 4, 4), (0, 0, 0), (0, 1, 1)), *starting(1, 3))
    decisions, _ = run(make_spec(max_replicas=2), [(0, mixed)])
    assert decisions[0].drain == (3, 1)
    (none_idle,), _ = run(make_spec(max_replicas=1), [(0, obs(*ready((0, 2, 3), (0, 1, 1))))])
    assert none_idle.drain == (1,)  # all busy: the one with the fewest requests in flight


def test_zero_after_the_idle_time_only() -> None:
    spec = make_spec(scale_down_window_s=60, idle_to_zero_s=600)
    ticks = [(0, obs(*ready((0, 1)))), *steady(obs(*ready((0, 0))), range(30, 700, 30))]
    decisions, _ = run(spec, ticks)
    counts = {second: d.replicas for (second, _), d in zip(ticks, decisions, strict=True)}
    assert counts[570] == 1 and counts[600] == 0
    assert decisions[counts_index(ticks, 600)].reason == "1 -> 0: no requests for 600s"


def counts_index(ticks: Sequence[tuple[float, Observation]], second: float) -> int:
    return [s for s, _ in ticks].index(second)


def test_streams_keep_a_deployment_from_zero() -> None:
    spec = make_spec(scale_down_window_s=60, idle_to_zero_s=100)
    streaming = obs(*ready((0, 0, 1)))  # the engine reports nothing, but a stream is still open
    draining = obs(*ready((0, 0)), ReplicaLoad(7, DRAINING, 0, 0, 2))
    for seen in (streaming, draining, obs(*ready((0, 1, 0))), obs(*ready((0, 0)), rate=0.1)):
        decisions, _ = run(spec, steady(seen, range(0, 1000, 50)))
        assert min(d.replicas for d in decisions) == 1


def test_min_replicas_or_zero_idle_time_keep_one() -> None:
    idle = steady(obs(*ready((0, 0), (0, 0))), range(0, 5000, 100))
    for spec in (make_spec(min_replicas=1), make_spec(idle_to_zero_s=0)):
        decisions, _ = run(spec, idle)
        assert decisions[-1].replicas == 1


def test_a_fresh_state_waits_a_window_before_scaling_down() -> None:
    """After a controller restart the state is new: replicas it did not start are not dropped at once."""
    decisions, _ = run(SPEC, steady(obs(*ready((0, 1), (0, 0), (0, 0))), [0, 299, 300]))
    assert [d.replicas for d in decisions] == [3, 3, 1]


def fluid(load: int, replicas: int, per_replica: int = 10) -> Observation:
    """``load`` requests spread over ready replicas; each runs at most ``per_replica``, the rest wait."""
    share, extra = divmod(load, replicas)
    loads = [share + (i < extra) for i in range(replicas)]
    return obs(*ready(*((max(0, n - per_replica), min(n, per_replica)) for n in loads)))


def settle(load: int, replicas: int, seconds: int = 3000, startup: int = 20) -> list[int]:
    """Replica counts per second under a constant load; a new replica is ready after ``startup``."""
    state, counts, ready_at = ScalerState(), [], [0] * replicas
    for second in range(seconds):
        live = sum(t <= second for t in ready_at)
        seen = fluid(load, live) if live else obs(buffered=load)
        pending = starting(len(ready_at) - live, live)
        decision, state = decide(
            SPEC, Observation(seen.replicas + pending, seen.gateway_buffered), state, at(second)
        )
        ready_at = (ready_at + [second + startup] * decision.replicas)[: decision.replicas]
        counts.append(decision.replicas)
    return counts


def reversals(counts: Sequence[int], window: float) -> int:
    """Changes of direction (a scale-down then up, or up then down) less than ``window`` ticks apart."""
    moves = [(i, 1 if b > a else -1) for i, (a, b) in enumerate(pairwise(counts)) if a != b]
    return sum(1 for (i, d), (j, e) in pairwise(moves) if d != e and j - i < window)


def test_a_load_between_one_and_two_replicas_does_not_flap() -> None:
    for load, start in ((16, 1), (16, 2), (12, 2), (6, 2), (9, 1)):
        counts = settle(load, start)
        assert reversals(counts, 300) == 0, (load, start)
        assert counts[-1] == (2 if load > 10 else 1), (load, start)


# --- properties --------------------------------------------------------------------------------------

replica_loads = st.builds(
    ReplicaLoad,
    index=st.integers(0, 30),
    state=st.sampled_from(list(ReplicaState)),
    waiting=st.integers(0, 200),
    running=st.integers(0, 64),
    in_flight=st.integers(0, 300),
)
observations = st.builds(
    Observation,
    replicas=st.lists(replica_loads, max_size=12, unique_by=lambda r: r.index).map(tuple),
    gateway_buffered=st.integers(0, 100),
    arrival_rate=st.none() | st.floats(0, 50),
)
specs = st.builds(
    lambda low, extra, target, up, down, idle: make_spec(
        min_replicas=low, max_replicas=max(1, low) + extra, target_waiting_per_replica=target,
        scale_up_window_s=up, scale_down_window_s=down, idle_to_zero_s=idle,
    ),
    st.integers(0, 4), st.integers(0, 8), st.floats(0.5, 16), st.integers(0, 30),
    st.integers(0, 600), st.integers(0, 900),
)  # fmt: skip
histories = st.lists(st.tuples(st.integers(1, 400), observations), min_size=1, max_size=25)


def replay(
    spec: DeploymentSpec, history: list[tuple[int, Observation]]
) -> list[tuple[Observation, ScaleDecision]]:
    """Decide over ``history`` (gaps in seconds, observations); the state carries over."""
    state, second, out = ScalerState(), 0, []
    for gap, seen in history:
        second += gap
        decision, state = decide(spec, seen, state, at(second))
        out.append((seen, decision))
    return out


@settings(max_examples=300, deadline=None)
@given(specs, histories)
def test_bounds_and_drains_always_hold(spec: DeploymentSpec, history: list[tuple[int, Observation]]) -> None:
    for seen, decision in replay(spec, history):
        assert spec.min_replicas <= decision.replicas <= spec.max_replicas
        active = {r.index for r in seen.active}
        current = len(active)
        assert len(set(decision.drain)) == len(decision.drain) and set(decision.drain) <= active
        assert len(decision.drain) == max(0, current - decision.replicas)


@settings(max_examples=300, deadline=None)
@given(specs, histories)
def test_no_traffic_never_scales_up_past_min(
    spec: DeploymentSpec, history: list[tuple[int, Observation]]
) -> None:
    for seen, decision in replay(spec, history):
        if not seen.has_traffic:
            assert decision.replicas <= max(spec.min_replicas, len(seen.active))


@settings(max_examples=200, deadline=None)
@given(specs, histories)
def test_decide_is_deterministic(spec: DeploymentSpec, history: list[tuple[int, Observation]]) -> None:
    assert replay(spec, history) == replay(spec, history)


# --- trace replay --------------------------------------------------------------------------------------

# The Azure LLM inference trace (code, 2023) lives in the shared folder beside the repository; hpcserve
# does not ship it. Columns: arrival_time_s, prompt_tokens, output_tokens, timestamp_orig.
TRACE = TRACES / "azure_llm_2023_code.csv"
WINDOW_START_S, WINDOW_S, COMPRESS = 540, 900, 1.5  # a busy quarter hour (~4 req/s), played 1.5x faster
LEAD_S, TAIL_S = 60, 1500  # quiet before and after the burst
SLOTS, SERVICE_S, STARTUP_S = 16, 8, 30  # per replica: 16 at once, 8 s each (2 req/s); 30 s to start
BURST_SPEC = make_spec(max_replicas=10, simulator={"max_num_seqs": SLOTS})


def arrivals_per_second() -> list[int]:
    per_second: Counter[int] = Counter()
    with TRACE.open(newline="") as f:
        for row in csv.DictReader(f):
            offset = float(row["arrival_time_s"]) - WINDOW_START_S
            if 0 <= offset < WINDOW_S:
                per_second[int(offset / COMPRESS)] += 1
    burst = [per_second[s] for s in range(int(WINDOW_S / COMPRESS))]
    return [0] * LEAD_S + burst + [0] * TAIL_S


@dataclass
class SimReplica:
    index: int
    state: ReplicaState
    ready_at: int
    busy: list[int] = field(default_factory=list)  # seconds left of each running request
    waiting: int = 0

    def load(self) -> ReplicaLoad:
        return ReplicaLoad(
            self.index, self.state, self.waiting, len(self.busy), self.waiting + len(self.busy)
        )

    def serve_one_second(self) -> None:
        self.busy = [left - 1 for left in self.busy if left > 1]
        take = min(self.waiting, SLOTS - len(self.busy))
        self.waiting -= take
        self.busy += [SERVICE_S] * take


class QueueModel:
    """Arrivals go to the least loaded ready replica, or wait at the gateway while none is ready."""

    def __init__(self) -> None:
        self.replicas: list[SimReplica] = []
        self.buffered = 0
        self.next_index = 0

    def arrive(self, second: int, count: int) -> Observation:
        for r in self.replicas:
            if r.state is STARTING and second >= r.ready_at:
                r.state = READY
        self.buffered += count
        ready_now = [r for r in self.replicas if r.state is READY]
        for _ in range(self.buffered if ready_now else 0):
            min(ready_now, key=lambda r: (len(r.busy) + r.waiting, r.index)).waiting += 1
        self.buffered = 0 if ready_now else self.buffered
        return Observation(tuple(r.load() for r in self.replicas), self.buffered)

    def apply(self, second: int, decision: ScaleDecision) -> None:
        active = [r for r in self.replicas if r.state is not DRAINING]
        for _ in range(decision.replicas - len(active)):
            self.replicas.append(SimReplica(self.next_index, STARTING, second + STARTUP_S))
            self.next_index += 1
        for r in [r for r in self.replicas if r.index in decision.drain]:
            if r.state is STARTING:
                self.replicas.remove(r)  # cancelled before it served anything
            else:
                r.state = DRAINING  # no new requests; gone once empty
        for r in self.replicas:
            r.serve_one_second()
        self.replicas = [r for r in self.replicas if r.state is not DRAINING or r.busy or r.waiting]


def test_trace_burst_scales_up_then_down_then_to_zero() -> None:
    if not TRACE.exists():
        pytest.skip(f"the shared trace {TRACE} is absent (it sits beside the repository, in shared/traces)")
    arrivals, model, state, counts = arrivals_per_second(), QueueModel(), ScalerState(), []
    for second, count in enumerate(arrivals):
        decision, state = decide(BURST_SPEC, model.arrive(second, count), state, at(second))
        model.apply(second, decision)
        counts.append(decision.replicas)
    burst_end = LEAD_S + int(WINDOW_S / COMPRESS)
    last_arrival = max(s for s, n in enumerate(arrivals) if n)
    first_down = next(s for s in range(burst_end, len(counts)) if counts[s] < counts[s - 1])
    zero_at = counts.index(0, burst_end)
    assert set(counts[:LEAD_S]) == {0}  # no traffic: nothing starts
    assert max(counts[LEAD_S:burst_end]) == BURST_SPEC.max_replicas  # the burst scales up to the cap
    assert 0 < first_down - last_arrival <= BURST_SPEC.scale_down_window_s + 10  # down after the window
    assert BURST_SPEC.idle_to_zero_s <= zero_at - last_arrival <= BURST_SPEC.idle_to_zero_s + 30
    assert set(counts[zero_at:]) == {0}
    assert reversals(counts, BURST_SPEC.scale_down_window_s) == 0  # no up-down-up, no 2 <-> 1
