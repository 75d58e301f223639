"""The training side: Slurm-like scheduling of the trace's jobs on the nodes of the training side.

- Priority FIFO: jobs in submit order (a requeued job keeps its place), whole GPUs on whole or part nodes.
- EASY backfill: the first job that does not fit gets a reservation at the earliest time enough nodes
  free up (running jobs end at start + remaining run time: exact run-time estimates); later jobs start
  if they fit now and either end by then or leave the reserved GPUs alone. At most ``depth`` queued jobs
  are looked at per pass (Slurm's bf_max_job_test).
- Placement: the service's ``select_nodes`` (fewest leaf switches, one fabric island, best fit) over the
  training side's nodes, called only for jobs that fit now (the cheap count below says so first).
- Preemption: when a node leaves for the inference side, the jobs on it get their signal and are killed
  ``grace_s`` later; a killed job is requeued and keeps only the work up to its last checkpoint
  (every ``checkpoint_s`` of run time), so it loses the rest. A job told to checkpoint on its signal
  (``signal(..., save=True)``: the overlap policies' gentle preemption) saves at the signal and loses
  only the save itself (the time from the signal to its kill).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from hpcserve.placement import FabricTopology, PlacementRequest, natural_key, select_nodes
from hpcserve.replay.traces import TrainingJob
from hpcserve.slurm.models import ClusterSnapshot, Node


@dataclass(slots=True)
class Run:
    """One job's life in the replay."""

    job: TrainingJob
    queued_since: float
    done: float = 0.0  # checkpointed work, seconds
    start: float | None = None  # of the current run
    nodes: tuple[str, ...] = ()
    waited: float = 0.0
    end: float | None = None
    token: int = 0  # tells a run's end event from a stale one
    preemptions: int = 0
    lost_s: float = 0.0  # run time thrown away by preemptions
    killing: bool = False
    saved_at: float | None = None  # the signal it checkpointed at (checkpoint on signal), if any

    @property
    def remaining(self) -> float:
        return self.job.duration - self.done

    def ends_at(self) -> float:
        """When the current run ends if left alone (inf when not running)."""
        return self.start + self.remaining if self.start is not None else float("inf")


@dataclass(frozen=True, slots=True)
class Start:
    job: int
    token: int
    end: float


@dataclass(slots=True)
class _Reservation:
    shadow: float
    spare: dict[str, int]  # GPUs a job running past ``shadow`` may take on each node
    blocked: set[tuple[int, int]] = field(default_factory=set)


class FreeIndex:
    """Free GPUs per usable node, counted per fabric island, so "does this shape fit" costs O(islands)."""

    def __init__(self, free: Mapping[str, int], island: Mapping[str, str]) -> None:
        self.island = island
        self.counts: dict[str, Counter[int]] = {}
        for node, gpus in free.items():
            self.counts.setdefault(island[node], Counter())[gpus] += 1

    def fits(self, nodes: int, gpus_per_node: int) -> bool:
        return any(
            sum(n for gpus, n in counts.items() if gpus >= gpus_per_node) >= nodes
            for counts in self.counts.values()
        )

    def any_free(self) -> bool:
        return any(gpus > 0 and n for counts in self.counts.values() for gpus, n in counts.items())

    def take(self, node: str, before: int, after: int) -> None:
        counts = self.counts[self.island[node]]
        counts[before] -= 1
        counts[after] += 1


class TrainingSide:
    """Queue, running jobs and the free GPUs of the training side's nodes."""

    def __init__(
        self,
        jobs: Sequence[TrainingJob],
        nodes: Iterable[str],
        gpus: Mapping[str, int],
        topology: FabricTopology,
        *,
        checkpoint_s: float,
        depth: int,
        at0: datetime,
    ) -> None:
        self.jobs, self.gpus, self.topology = jobs, gpus, topology
        self.checkpoint_s, self.depth, self.at0 = checkpoint_s, depth, at0
        self.island = {node: topology.island_of(topology.leaf_of(node)) for node in gpus}
        self.free: dict[str, int] = {node: gpus[node] for node in nodes}
        self.on_node: dict[str, set[int]] = {node: set() for node in gpus}
        self.leaving: set[str] = set()
        self.queue: list[tuple[float, int]] = []
        self.runs: dict[int, Run] = {}
        self.running: dict[int, Run] = {}
        self.busy_gpus = 0
        self.preemptions = 0
        self.lost_gpu_s = 0.0

    # --- events -----------------------------------------------------------------------------------

    def submit(self, job: TrainingJob, now: float) -> None:
        self.runs[job.id] = Run(job, queued_since=now)
        bisect.insort(self.queue, (job.submit, job.id))

    def finish(self, job_id: int, token: int, now: float) -> bool:
        """A run ended on time; False for a stale event (the run was preempted meanwhile)."""
        run = self.running.get(job_id)
        if run is None or run.token != token:
            return False
        run.done, run.end = run.job.duration, now
        self._release(run)
        return True

    def kill(self, job_id: int, now: float) -> None:
        """The preemption's grace is over: stop the job and requeue it from its last checkpoint."""
        run = self.running.get(job_id)
        if run is None or not run.killing:
            return
        assert run.start is not None
        ran = now - run.start
        if run.saved_at is not None:
            kept = run.saved_at - run.start
        else:
            kept = (ran // self.checkpoint_s) * self.checkpoint_s
        run.done, run.lost_s = min(run.done + kept, run.job.duration), run.lost_s + ran - kept
        run.preemptions += 1
        self.preemptions += 1
        self.lost_gpu_s += (ran - kept) * run.job.gpus
        self._release(run)
        run.queued_since, run.killing, run.saved_at = now, False, None
        bisect.insort(self.queue, (run.job.submit, run.job.id))

    def _release(self, run: Run) -> None:
        for node in run.nodes:
            self.on_node[node].discard(run.job.id)
            if node in self.free:
                self.free[node] += run.job.gpus_per_node
        self.busy_gpus -= run.job.gpus
        run.nodes, run.start, run.token = (), None, run.token + 1
        del self.running[run.job.id]

    # --- nodes ------------------------------------------------------------------------------------

    def take_node(self, node: str) -> tuple[int, ...]:
        """``node`` leaves the training side: no new work; returns the jobs to signal (killed after grace)."""
        self.free.pop(node, None)
        self.leaving.add(node)
        victims = tuple(sorted(j for j in self.on_node[node] if not self.running[j].killing))
        for job_id in victims:
            self.running[job_id].killing = True
        return victims

    def pop_drained(self) -> list[str]:
        """Leaving nodes that no job runs on any more (ready to move)."""
        drained = sorted((n for n in self.leaving if not self.on_node[n]), key=natural_key)
        self.leaving.difference_update(drained)
        return drained

    def add_node(self, node: str) -> None:
        self.free[node] = self.gpus[node]

    def since_checkpoint(self, run: Run, now: float) -> float:
        """Run time since the job's last periodic checkpoint (what a kill now would lose)."""
        return (now - (run.start if run.start is not None else now)) % self.checkpoint_s

    def signal(self, job_ids: Sequence[int], now: float, *, save: bool) -> None:
        """The jobs got their preemption signal at ``now``; ``save``: they checkpoint on it."""
        for job_id in job_ids:
            self.running[job_id].saved_at = now if save else None

    def loss_if_taken(self, node: str, now: float) -> float:
        """GPU-seconds of work lost if ``node`` were taken now (0 for a free node)."""
        lost = 0.0
        for job_id in self.on_node[node]:
            run = self.running[job_id]
            ran = now - (run.start or now)
            lost += (ran % self.checkpoint_s) * run.job.gpus
        return lost

    def pending_gpus(self) -> int:
        return sum(self.runs[job_id].job.gpus for _, job_id in self.queue)

    # --- scheduling -------------------------------------------------------------------------------

    def schedule(self, now: float) -> list[Start]:
        """One pass of FIFO + EASY backfill; returns the runs started (the caller schedules their ends)."""
        index = FreeIndex(self.free, self.island)
        reservation: _Reservation | None = None
        blocked: set[tuple[int, int]] = set()
        started: list[Start] = []
        for _, job_id in list(self.queue[: self.depth]):
            if not index.any_free():
                break
            run = self.runs[job_id]
            shape = (run.job.nodes, run.job.gpus_per_node)
            if shape in blocked or not index.fits(*shape):
                blocked.add(shape)
                if reservation is None:
                    reservation = self._reserve(run)
                continue
            allowed = self._allowed(run, now, reservation)
            if allowed is None:
                continue
            started.append(self._start(run, now, allowed, index, reservation))
        return started

    def _allowed(self, run: Run, now: float, reservation: _Reservation | None) -> frozenset[str] | None:
        """The nodes the job may use now: any, or only spare ones when it would delay the reservation."""
        if reservation is None or now + run.remaining <= reservation.shadow:
            return frozenset(self.free)
        shape = (run.job.nodes, run.job.gpus_per_node)
        if shape in reservation.blocked:
            return None
        gpn = run.job.gpus_per_node
        nodes = [n for n, f in self.free.items() if f >= gpn and reservation.spare.get(n, 0) >= gpn]
        if not FreeIndex(dict.fromkeys(nodes, gpn), self.island).fits(*shape):
            reservation.blocked.add(shape)
            return None
        return frozenset(nodes)

    def _reserve(self, head: Run) -> _Reservation | None:
        """When and where the head job could start if nothing else started; None if it never could."""
        free_at = dict(self.free)
        gpn, need = head.job.gpus_per_node, head.job.nodes
        ends = sorted(
            (r.start + r.remaining if r.start is not None else 0.0, r.job.id) for r in self.running.values()
        )
        for end, job_id in ends:
            for node in self.running[job_id].nodes:
                if node in free_at:
                    free_at[node] += self.running[job_id].job.gpus_per_node
            chosen = _pick(free_at, self.island, need, gpn)
            if chosen is not None:
                spare = {n: f - (gpn if n in chosen else 0) for n, f in free_at.items()}
                return _Reservation(end, spare)
        return None

    def _start(
        self,
        run: Run,
        now: float,
        allowed: frozenset[str],
        index: FreeIndex,
        reservation: _Reservation | None,
    ) -> Start:
        job = run.job
        request = PlacementRequest(nodes=job.nodes, gpus_per_node=job.gpus_per_node, candidates=allowed)
        placement = select_nodes(request, self._snapshot(), self.topology)
        assert placement.fits_now, placement.reason
        for node in placement.nodes:
            index.take(node, self.free[node], self.free[node] - job.gpus_per_node)
            self.free[node] -= job.gpus_per_node
            self.on_node[node].add(job.id)
            if reservation is not None and now + run.remaining > reservation.shadow:
                reservation.spare[node] -= job.gpus_per_node
        self.queue.remove((job.submit, job.id))
        run.waited += now - run.queued_since
        run.start, run.nodes = now, placement.nodes
        self.running[job.id] = run
        self.busy_gpus += job.gpus
        return Start(job.id, run.token, now + run.remaining)

    def _snapshot(self) -> ClusterSnapshot:
        """The training side's nodes as placement sees them (only their GPUs matter to it)."""
        nodes = tuple(
            Node(
                name,
                _state(free, self.gpus[name]),
                gpus_total=self.gpus[name],
                gpus_alloc=self.gpus[name] - free,
            )
            for name, free in self.free.items()
        )
        return ClusterSnapshot(at=self.at0, nodes=nodes, jobs=(), partitions=())


def _state(free: int, total: int) -> str:
    return "idle" if free >= total else ("allocated" if free <= 0 else "mixed")


def _pick(free: Mapping[str, int], island: Mapping[str, str], need: int, gpn: int) -> set[str] | None:
    """Some ``need`` nodes of one island with ``gpn`` free GPUs each (fullest first), or None."""
    by_island: dict[str, list[str]] = {}
    for node, gpus in free.items():
        if gpus >= gpn:
            by_island.setdefault(island[node], []).append(node)
    for isle in sorted(by_island):
        nodes = sorted(by_island[isle], key=lambda n: (free[n], natural_key(n)))
        if len(nodes) >= need:
            return set(nodes[:need])
    return None
