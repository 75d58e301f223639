"""The second source of GPU telemetry: slurmd's own ``gres/gpuutil`` and ``gres/gpumem``, read from sacct
(``hpcserve.slurm.gpu_usage``) for the jobs that ended since the last read, and stored with source
"sacct". One batched sacct call (slurmdbd, not slurmctld) per tick; a job already read is not stored again,
so a restart that reads the last ``LOOKBACK`` again adds nothing twice. A replica's job (a job id the
replicas table knows) is stored as inference with its deployment; any other as training.

On a cluster whose slurmd does not gather GPU usage (the local cluster's fake GPUs), sacct prints no
``gres/gpuutil`` and every tick stores nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from hpcserve.model.telemetry import GpuSample
from hpcserve.slurm.gpu_usage import job_samples, parse_sacct_gpu, sacct_gpu_argv

if TYPE_CHECKING:
    from hpcserve.slurm.protocol import CommandRunner
    from hpcserve.store import HistoryStore

log = logging.getLogger("hpcserve.telemetry")
INTERVAL_S = 300.0
LOOKBACK = timedelta(hours=1)  # the first read after a start


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _sacct_time(at: datetime) -> str:
    return at.astimezone().strftime("%Y-%m-%dT%H:%M:%S")


class SacctGpu:
    """``tick()`` reads sacct since the last tick and stores what it finds; how many readings."""

    def __init__(self, runner: CommandRunner, store: HistoryStore, timeout_s: float,
                 clock: Callable[[], datetime] = _utc_now) -> None:  # fmt: skip
        self.runner, self.store, self.timeout_s, self.clock = runner, store, timeout_s, clock
        self.since: datetime | None = None

    def tick(self) -> int:
        now = self.clock()
        since = self.since or now - LOOKBACK
        out = self.runner(sacct_gpu_argv(_sacct_time(since), _sacct_time(now)), timeout=self.timeout_s)
        found = job_samples(parse_sacct_gpu(out.stdout))
        stored = self._store(found, since) if found else 0
        self.since = now - timedelta(seconds=60)  # slurmdbd lags: overlap the next read a little
        if stored:
            log.info("telemetry: %d jobs' GPU usage read from sacct", stored)
        return stored

    def _store(self, found: list[tuple[str, GpuSample]], since: datetime) -> int:
        ids = [sample.job_id for _, sample in found]
        seen = {
            r.job_id for r in self.store.gpu_samples(since - LOOKBACK, job_ids=ids) if r.source == "sacct"
        }
        replicas = {r.job_id: r.deployment for r in self.store.replicas() if r.job_id in ids}
        stored = 0
        for user, sample in found:
            if sample.job_id in seen:
                continue
            deployment = replicas.get(sample.job_id)
            kind = "inference" if deployment else "training"
            stored += self.store.add_gpu_samples([sample], user=user, kind=kind, deployment=deployment,
                                                 source="sacct")  # fmt: skip
        return stored
