"""GPU telemetry on the service's /metrics: a collector that reads the store at each scrape (two small
queries: the newest reading of each GPU, and the idle tick's flags).

- ``hpcserve_job_gpu_utilization_ratio{job_id,user,gpu}`` (0..1), ``hpcserve_job_gpu_memory_used_bytes``,
  ``hpcserve_job_gpu_memory_total_bytes`` and ``hpcserve_job_gpu_power_watts`` (GPUs that report power):
  the newest reading of each GPU of each running job (``gpu`` is its index in the job). A job is running if
  the idle tick's last Slurm view says so; without one (no tick ran in this process yet) a reading newer
  than twice ``idle.sample_gap_s`` (at least a minute) counts;
- ``hpcserve_job_idle{job_id,user,kind}``: 1 for each job flagged idle now;
- ``hpcserve_idle_gpu_hours{kind}``: the GPU-hours wasted by the jobs flagged now (a gauge: a flag that
  ends takes its hours with it).
A database that does not answer costs these families for that scrape (one warning), not the scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hpcserve.api.telemetry import FLAGS_STATE, current_flags
from hpcserve.model.telemetry import JOB_KINDS

if TYPE_CHECKING:
    from hpcserve.config.policy import IdleRules
    from hpcserve.store import GpuSampleRecord, HistoryStore

log = logging.getLogger("hpcserve.metrics")
GPU_LABELS = ["job_id", "user", "gpu"]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class TelemetryCollector(Collector):
    def __init__(self, store: HistoryStore, rules: IdleRules,
                 running: Callable[[], frozenset[str] | None] = lambda: None,
                 clock: Callable[[], datetime] = _utc_now) -> None:  # fmt: skip
        self.store, self.rules, self.running, self.clock = store, rules, running, clock
        self.failing = False

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        try:
            latest = self._latest(now)
            flags = current_flags(self.store.get_state(FLAGS_STATE), now)
        except Exception as exc:  # the database is away: these families wait for it, the scrape does not
            if not self.failing:
                log.warning("GPU telemetry metrics: cannot read the store (%s)", str(exc).splitlines()[0])
            self.failing = True
            return iter(())
        self.failing = False
        idle = GaugeMetricFamily("hpcserve_job_idle", "1 while the job is flagged idle (policy idle)",
                                 labels=["job_id", "user", "kind"])  # fmt: skip
        for flag in flags:
            idle.add_metric([flag.job_id, flag.user, flag.kind], 1)
        wasted = GaugeMetricFamily("hpcserve_idle_gpu_hours", "GPU-hours wasted by the jobs flagged idle now",
                                   labels=["kind"])  # fmt: skip
        for kind in JOB_KINDS:
            wasted.add_metric([kind], round(sum(f.gpu_hours_wasted for f in flags if f.kind == kind), 6))
        return iter([*gpu_families(latest), idle, wasted])

    def _latest(self, now: datetime) -> list[GpuSampleRecord]:
        running = self.running()
        fresh_s = max(2 * self.rules.sample_gap_s, 60)
        latest = self.store.latest_gpu_samples(now - timedelta(seconds=fresh_s))
        return latest if running is None else [r for r in latest if r.job_id in running]


def gpu_families(latest: list[GpuSampleRecord]) -> list[Metric]:
    """The per-GPU gauges of the newest readings."""
    util = GaugeMetricFamily("hpcserve_job_gpu_utilization_ratio", "GPU utilisation (NVML utilization.gpu)"
                             ", 0..1, newest reading", labels=GPU_LABELS)  # fmt: skip
    used = GaugeMetricFamily("hpcserve_job_gpu_memory_used_bytes", "GPU memory in use, newest reading",
                             labels=GPU_LABELS)  # fmt: skip
    total = GaugeMetricFamily("hpcserve_job_gpu_memory_total_bytes", "GPU memory of the device",
                              labels=GPU_LABELS)  # fmt: skip
    power = GaugeMetricFamily("hpcserve_job_gpu_power_watts", "GPU power draw, newest reading",
                              labels=GPU_LABELS)  # fmt: skip
    for r in latest:
        labels = [r.job_id, r.user, str(r.gpu_index)]
        util.add_metric(labels, round(r.util_pct / 100, 4))
        used.add_metric(labels, r.mem_used_bytes)
        total.add_metric(labels, r.mem_total_bytes)
        if r.power_w is not None:
            power.add_metric(labels, r.power_w)
    return [util, used, total, power]
