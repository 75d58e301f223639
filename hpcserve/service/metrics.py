"""The service's Prometheus metrics (``hpcserve service --metrics-port``, on the host of
``service.metrics_listen``). A registry of its own, no module globals. Names follow Prometheus's
conventions: base units in the name (``_seconds``, ``_gpu_hours``, ``_dollars_per_hour``), ``_total`` on
counters (prometheus_client adds it to a Counter's name), no ``job``/``instance`` labels (Prometheus sets
those itself).

Families (all ``hpcserve_*``):
- ``service_ticks_total{task}``, ``service_errors_total{task}``: the service's jobs (sampler, serving, ...);
- ``sampler_last_sample_timestamp_seconds``, ``sampler_slurmctld_unreachable`` (1 while squeue fails);
- ``rebalance_moves_applied_total``, ``rebalance_plans_total{state}``, ``rebalance_split_reasserted_total``;
- from the sampler's read (the shared Slurm view's squeue and sinfo; absent while slurmctld does not
  answer): ``queue_pending_jobs{partition}``, ``queue_pending_gpus{partition}``,
  ``partition_gpus{partition,state}`` (running, idle, total), ``gpu_cost_dollars_per_hour{partition}``
  (allocated GPUs x the site's ``cost.gpu_hour_price``, in its ``cost.currency``) and
  ``cluster_gpu_cost_dollars_per_hour`` (each node once);
- from the history database, read by the ``metrics`` tick: ``deployment_replicas{deployment,state}``,
  ``deployment_desired_replicas{deployment}``, ``deployment_gpus{deployment}``,
  ``deployment_gpu_cost_dollars_per_hour{deployment}``, ``replica_starts_total{deployment}``,
  ``replica_failures_total{deployment}``, ``lending_events_total{kind}`` (node moves ``to_inference`` and
  ``to_training`` of finished plans, ``eviction`` of training jobs for replicas), ``lost_gpu_hours_total``,
  ``lease_held{lease}`` (1 while this process holds it) and ``lease_lost_total{lease}``. Counters count
  from the service's start;
- from each live replica's recorded start (``replicas.phases``, hpcserve.serving.phases):
  ``replica_start_phase_seconds{deployment,replica,phase,staging}`` (phase: queue_wait, staging,
  engine_load, first_healthy, first_token; staging: warm-valid, hashed, copied or none) and
  ``replica_staged_bytes{deployment,replica,staging,what}`` (what: copied, hashed).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hpcserve.service.metrics_figures import (
    LENDING_KINDS,
    ClusterFigures,
    DeploymentFigures,
    LeaseWatch,
    LostWorkWatch,
    PlanWatch,
    Price,
    ReplicaWatch,
    cluster_figures,
    deployment_figures,
)

if TYPE_CHECKING:
    from hpcserve.model.cluster import Job, Node
    from hpcserve.rebalance.control import RoundReport
    from hpcserve.rebalance.sampler import Sampler
    from hpcserve.store import HistoryStore, Replica

TimedRead = Callable[[], tuple[datetime, Sequence["Job"], Sequence["Node"]]]
Rows = Iterable[tuple[Sequence[str], float]]
PLAN_STATES = ("done", "failed", "aborted")
RECENT_PLANS = 50
ENGINE_STATES = frozenset({"starting", "ready", "draining"})


def no_price(gpu_type: str | None) -> float:
    return 0.0


class ServiceMetrics:
    def __init__(self, price: Price = no_price) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.ticks = Counter("hpcserve_service_ticks", "Service job ticks run", ["task"], registry=reg)
        self.errors = Counter(
            "hpcserve_service_errors", "Service job ticks that failed", ["task"], registry=reg
        )
        self.last_sample = Gauge("hpcserve_sampler_last_sample_timestamp_seconds",
                                 "Unix time of the newest queue sample stored", registry=reg)  # fmt: skip
        self.slurm_down = Gauge("hpcserve_sampler_slurmctld_unreachable",
                                "1 while slurmctld does not answer the sampler", registry=reg)  # fmt: skip
        self.moves = Counter("hpcserve_rebalance_moves_applied", "Node moves carried out", registry=reg)
        self.plans = Counter("hpcserve_rebalance_plans", "Rebalance plans run, by final state", ["state"],
                             registry=reg)  # fmt: skip
        for state in PLAN_STATES:
            self.plans.labels(state=state)
        self.reasserted = Counter("hpcserve_rebalance_split_reasserted",
                                  "Partitions re-set to the split after drifting", registry=reg)  # fmt: skip
        self.price = price
        self.watched = Watched()
        reg.register(_FiguresCollector(self.watched))

    def serve(self, port: int, addr: str) -> None:
        """/metrics on ``addr:port``: the site's admin address (``service.metrics_listen``), not the API's;
        and ``/sd/engines``, the replicas' engines for Prometheus's ``http_sd_configs``."""
        from hpcserve.service.metrics_http import serve_metrics

        serve_metrics(addr, port, make_wsgi_app(self.registry), {"/sd/engines": self.engine_targets})

    def engine_targets(self) -> list[dict[str, object]]:
        """Prometheus HTTP service discovery: one target group per replica engine that may answer."""
        with self.watched.lock:
            replicas = list(self.watched.engines)
        return [
            {
                "targets": [f"{r.host}:{r.port}"],
                "labels": {"deployment": r.deployment, "replica": str(r.index)},
            }
            for r in replicas
            if r.host and r.port and r.state in ENGINE_STATES
        ]

    def ticked(self, task: str) -> None:
        self.ticks.labels(task=task).inc()
        self.errors.labels(task=task)  # at 0 until one fails, so rate() has a series to work on

    def failed(self, task: str) -> None:
        self.errors.labels(task=task).inc()

    def sampled(self, sampler: Sampler) -> None:
        if sampler.last_sample is not None:
            self.last_sample.set(sampler.last_sample.timestamp())
        self.slurm_down.set(1 if sampler.down_since is not None else 0)
        if sampler.down_since is not None:
            self.watched.cluster = None  # no figures from a read that is no longer true

    def rebalanced(self, report: RoundReport) -> None:
        self.moves.inc(report.moves_applied)
        if report.state is not None:
            self.plans.labels(state=report.state).inc()
        self.reasserted.inc(len(report.reasserted))

    def reading(self, read: TimedRead) -> TimedRead:
        """``read`` (the sampler's), also turned into the cluster's figures each time it is a new read."""

        def observed() -> tuple[datetime, Sequence[Job], Sequence[Node]]:
            at, jobs, nodes = read()
            current = self.watched.cluster
            if current is None or not current.samples or current.samples[0].at != at:
                self.watched.cluster = cluster_figures(at, jobs, nodes, self.price)
            return at, jobs, nodes

        return observed

    def look(self, store: HistoryStore, holder: str, leases: Collection[str]) -> None:
        """The ``metrics`` tick: replicas, finished plans, evictions and this process's leases, from the
        history database (a few small reads)."""
        from hpcserve.store.leases import leases_held

        now = datetime.now(UTC)
        deployments, replicas = store.list_deployments(), store.replicas()
        plans = store.plans(last=RECENT_PLANS)
        since = self.watched.lost.since
        lost = store.lost_work(since=since) if since is not None else []
        held = leases_held(store, holder, now)
        with self.watched.lock:
            w = self.watched
            w.deployments = deployment_figures(deployments, replicas, w.cluster)
            w.engines = tuple(replicas)
            w.replicas.look(replicas)
            w.plans.look(plans)
            w.lost.look(lost, now)
            w.leases.look({name: held.get(name, False) for name in leases})


class Watched:
    """What the ticks saw last, for the collector (the lock keeps a scrape from reading counts mid-look)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cluster: ClusterFigures | None = None
        self.deployments: DeploymentFigures | None = None
        self.engines: tuple[Replica, ...] = ()
        self.replicas, self.plans = ReplicaWatch(), PlanWatch()
        self.lost, self.leases = LostWorkWatch(), LeaseWatch()


def _gauge(name: str, doc: str, labels: Sequence[str], rows: Rows) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    for values, value in rows:
        family.add_metric(list(values), value)
    return family


def _counter(name: str, doc: str, labels: Sequence[str], rows: Rows) -> Metric:
    family = CounterMetricFamily(name, doc, labels=list(labels))
    for values, value in rows:
        family.add_metric(list(values), value)
    return family


class _FiguresCollector(Collector):
    def __init__(self, watched: Watched) -> None:
        self.watched = watched

    def collect(self) -> Iterator[Metric]:
        with self.watched.lock:
            families = [*self._cluster(), *self._deployments(), *self._lending(), *self._leases(),
                        *_start_phases(self.watched.engines)]  # fmt: skip
        return iter(families)

    def _cluster(self) -> list[Metric]:
        figures = self.watched.cluster
        if figures is None:
            return []
        rows = figures.samples
        states = ("running", "idle", "total")
        return [
            _gauge("hpcserve_queue_pending_jobs", "Jobs waiting to start, by partition", ["partition"],
                   (((s.partition,), s.pending_jobs) for s in rows)),
            _gauge("hpcserve_queue_pending_gpus", "GPUs asked for by jobs waiting to start", ["partition"],
                   (((s.partition,), s.pending_gpus) for s in rows)),
            _gauge("hpcserve_partition_gpus", "GPUs of the partition: held by running jobs, idle (free on "
                   "available nodes), total", ["partition", "state"],
                   (((s.partition, st), getattr(s, f"{st}_gpus")) for s in rows for st in states)),
            _gauge("hpcserve_gpu_cost_dollars_per_hour", "Price of the partition's allocated GPUs per hour "
                   "(site cost.gpu_hour_price, in cost.currency)", ["partition"],
                   (((p,), c) for p, c in sorted(figures.cost_per_hour.items()))),
            _gauge("hpcserve_cluster_gpu_cost_dollars_per_hour", "Price of all allocated GPUs per hour "
                   "(each node once)", [], iter([((), figures.cluster_cost_per_hour)])),
        ]  # fmt: skip

    def _deployments(self) -> list[Metric]:
        figures, watch = self.watched.deployments, self.watched.replicas
        if figures is None:
            return []
        names = sorted(figures.desired)
        return [
            _gauge("hpcserve_deployment_replicas", "Replicas by state", ["deployment", "state"],
                   ((key, n) for key, n in sorted(figures.replicas.items()))),
            _gauge("hpcserve_deployment_desired_replicas", "Replicas the deployment asks for", ["deployment"],
                   (((d,), figures.desired[d]) for d in names)),
            _gauge("hpcserve_deployment_gpus", "GPUs held by the deployment's running replicas",
                   ["deployment"], (((d,), figures.gpus[d]) for d in names)),
            _gauge("hpcserve_deployment_gpu_cost_dollars_per_hour", "Price of the deployment's GPUs per hour",
                   ["deployment"], (((d,), round(figures.cost_per_hour[d], 6)) for d in names)),
            _counter("hpcserve_replica_starts", "Replica jobs started (a new job at a replica's slot)",
                     ["deployment"], (((d,), watch.started[d]) for d in names)),
            _counter("hpcserve_replica_failures", "Replicas that died (seen dead, or replaced under the same "
                     "spec)", ["deployment"], (((d,), watch.failures[d]) for d in names)),
        ]  # fmt: skip

    def _lending(self) -> list[Metric]:
        plans, lost = self.watched.plans, self.watched.lost
        counts = {"to_inference": plans.moves["to_inference"], "to_training": plans.moves["to_training"],
                  "eviction": lost.evictions}  # fmt: skip
        return [
            _counter("hpcserve_lending_events", "Nodes moved between training and inference by finished "
                     "plans, and training jobs evicted for replicas", ["kind"],
                     (((k,), counts[k]) for k in LENDING_KINDS)),
            _counter("hpcserve_lost_gpu_hours", "GPU-hours of training work lost to evictions", [],
                     iter([((), round(lost.lost_gpu_h, 6))])),
        ]  # fmt: skip

    def _leases(self) -> list[Metric]:
        leases = self.watched.leases
        names = sorted(leases.held)
        return [
            _gauge("hpcserve_lease_held", "1 while this process holds the lease", ["lease"],
                   (((n,), 1 if leases.held[n] else 0) for n in names)),
            _counter("hpcserve_lease_lost", "Times this process lost a lease it held", ["lease"],
                     (((n,), leases.lost[n]) for n in names)),
        ]  # fmt: skip


def _start_phases(replicas: Iterable[Replica]) -> list[Metric]:
    """Each live replica's start, phase by phase, and what its staging moved (a record that does not
    parse is left out)."""
    from hpcserve.errors import ValidationError
    from hpcserve.serving.phases import StartPhases

    seconds: list[tuple[Sequence[str], float]] = []
    moved: list[tuple[Sequence[str], float]] = []
    for replica in replicas:
        if not replica.phases or replica.state not in ENGINE_STATES:
            continue
        try:
            phases = StartPhases.from_json(replica.phases)
        except ValidationError:
            continue
        labels = (replica.deployment, str(replica.index))
        kind = phases.staging.kind
        seconds += [((*labels, phase, kind), value) for phase, value in phases.seconds().items()]
        moved += [((*labels, kind, "copied"), phases.staging.bytes), ((*labels, kind, "hashed"),
                  phases.staging.hashed_bytes)]  # fmt: skip
    return [
        _gauge("hpcserve_replica_start_phase_seconds", "Seconds each phase of the replica's start took "
               "(queue_wait, staging, engine_load, first_healthy, first_token); staging: warm-valid, hashed, "
               "copied or none", ["deployment", "replica", "phase", "staging"], seconds),
        _gauge("hpcserve_replica_staged_bytes", "Bytes the replica's staging copied from the cold tier or "
               "hashed", ["deployment", "replica", "staging", "what"], moved),
    ]  # fmt: skip
