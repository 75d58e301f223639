"""GPU telemetry and idle flags: what the in-job sampler reports and what the idle decision returns.

Pure: no I/O imports (import-linter checks ``hpcserve.model``). The sampler (``hpcserve.telemetry.nvml``)
makes ``GpuSample`` values, the service stores them (``hpcserve.store.telemetry``), and the idle decision
(``hpcserve.telemetry.idle``) turns them into ``IdleFlag`` values.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

JobKind = Literal["training", "inference"]
JOB_KINDS: tuple[JobKind, ...] = ("training", "inference")
SampleSource = Literal["nvml", "sacct"]


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One reading of one GPU of a job.

    ``at`` is tz-aware UTC. ``gpu_uuid``: "GPU-..." from NVML, "" when unknown. ``gpu_index``: the index
    within the job's visible devices (CUDA_VISIBLE_DEVICES order). ``util_pct``: 0..100, NVML
    utilization.gpu. ``power_w`` and ``sm_clock_mhz``: None where the device does not report them.
    """

    at: datetime
    job_id: str
    gpu_uuid: str
    gpu_index: int
    util_pct: float
    mem_used_bytes: int
    mem_total_bytes: int
    power_w: float | None
    sm_clock_mhz: int | None


@dataclass(frozen=True, slots=True)
class IdleFlag:
    """A job flagged idle: its GPUs averaged under the policy's threshold for the whole window, or (a
    replica) it served no request for ``replica_no_requests_s``.

    ``kind``: "training" | "inference". ``reason``: one line, e.g. "GPUs averaged 5% for 30 min (< 20%)".
    ``since``: when the idle stretch began (the start of the window that flagged it).
    ``gpu_hours_wasted``: ``gpus`` x hours since ``since``. ``mean_util_pct``: None where no sample
    explains the flag (a replica flagged only for serving nothing, without telemetry).
    """

    job_id: str
    user: str
    kind: str
    reason: str
    since: datetime
    gpus: int
    gpu_hours_wasted: float
    mean_util_pct: float | None
