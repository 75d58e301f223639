"""A replay's figures per policy, and how they are derived from the end state (pure).

- training queueing delay: per job, all the time it spent queued (first wait plus every wait after a
  preemption); a job still queued at the end counts with its wait so far. Mean and p95 over the jobs
  submitted in the replay.
- JCT: end - submit, over the jobs that finished.
- GPU utilization: GPU-seconds held by running training jobs and by placed replicas (starting or ready),
  over all GPUs of both sides for the whole replay.
- inference SLO attainment: the share of requests that waited at most ``slo_wait_s`` (requests still
  queued at the end count with their wait so far); p99 wait, to the fluid model's step.
- node moves per day (the initial split at time 0 is free), preemptions, work lost to them (GPU-hours).
Everything counts from the end of the warm-up: jobs submitted, requests arriving, GPU-seconds, moves and
preemptions after it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from hpcserve.replay.training import Run


@dataclass(frozen=True, slots=True)
class PolicyResult:
    policy: str
    days: float
    jobs: int
    finished: int
    queue_mean_s: float
    queue_p95_s: float
    jct_mean_s: float
    gpu_util: float
    slo_attainment: float
    p99_wait_s: float
    requests: float
    moves: int
    moves_per_day: float
    preemptions: int
    lost_gpu_h: float
    mean_inference_nodes: float
    wall_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class TrainingFigures:
    jobs: int
    finished: int
    queue_mean_s: float
    queue_p95_s: float
    jct_mean_s: float


def training_figures(runs: Iterable[Run], now: float, since: float) -> TrainingFigures:
    """Queueing and completion figures of the jobs submitted at ``since`` or later, as of ``now``."""
    waits, jcts = [], []
    for run in runs:
        if run.job.submit < since:
            continue
        queued = run.start is None and run.end is None
        waits.append(run.waited + (now - run.queued_since if queued else 0.0))
        if run.end is not None:
            jcts.append(run.end - run.job.submit)
    return TrainingFigures(
        jobs=len(waits),
        finished=len(jcts),
        queue_mean_s=_mean(waits),
        queue_p95_s=percentile(waits, 0.95),
        jct_mean_s=_mean(jcts),
    )


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (``q`` in [0, 1]); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(max(math.ceil(q * len(ordered)) - 1, 0), len(ordered) - 1)]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
