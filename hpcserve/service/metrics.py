"""The service's Prometheus metrics (``hpcserve service --metrics-port``, on the host of
``service.metrics_listen``): ticks and errors per job, the
sampler's last sample and Slurm gap, rebalance plans and moves. A registry of its own, no module globals."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

if TYPE_CHECKING:
    from hpcserve.rebalance.control import RoundReport
    from hpcserve.rebalance.sampler import Sampler


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.ticks = Counter("hpcserve_service_ticks", "Service job ticks run", ["job"], registry=reg)
        self.errors = Counter(
            "hpcserve_service_errors", "Service job ticks that failed", ["job"], registry=reg
        )
        self.last_sample = Gauge("hpcserve_sampler_last_sample_timestamp_seconds",
                                 "Unix time of the newest queue sample stored", registry=reg)  # fmt: skip
        self.slurm_down = Gauge("hpcserve_sampler_slurmctld_unreachable",
                                "1 while slurmctld does not answer the sampler", registry=reg)  # fmt: skip
        self.moves = Counter("hpcserve_rebalance_moves_applied", "Node moves carried out", registry=reg)
        self.plans = Counter("hpcserve_rebalance_plans", "Rebalance plans run, by final state", ["state"],
                             registry=reg)  # fmt: skip
        self.reasserted = Counter("hpcserve_rebalance_split_reasserted",
                                  "Partitions re-set to the split after drifting", registry=reg)  # fmt: skip

    def serve(self, port: int, addr: str) -> None:
        """/metrics on ``addr:port``: the site's admin address (``service.metrics_listen``), not the API's."""
        start_http_server(port, addr=addr, registry=self.registry)

    def ticked(self, job: str) -> None:
        self.ticks.labels(job=job).inc()

    def failed(self, job: str) -> None:
        self.errors.labels(job=job).inc()

    def sampled(self, sampler: Sampler) -> None:
        if sampler.last_sample is not None:
            self.last_sample.set(sampler.last_sample.timestamp())
        self.slurm_down.set(1 if sampler.down_since is not None else 0)

    def rebalanced(self, report: RoundReport) -> None:
        self.moves.inc(report.moves_applied)
        if report.state is not None:
            self.plans.labels(state=report.state).inc()
        self.reasserted.inc(len(report.reasserted))
