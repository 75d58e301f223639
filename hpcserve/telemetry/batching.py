"""What the reporter sends and when it tries again. Pure: the reporter (``reporter``) does the I/O.

A report is ``POST /v1/telemetry`` with ``{"job_id", "samples": [...], "deployment", "index"}`` (the last two
only from a replica), at most ``MAX_SAMPLES_PER_CALL`` samples each. Samples that could not be sent wait in a
buffer of at most ``MAX_BUFFERED`` (the oldest go first) and are sent with the next report. After a failure
the reporter waits ``retry_delay_s`` before it reports again: the sampling interval doubled per failure in a
row, up to ``MAX_RETRY_DELAY_S``. A refusal (a 4xx other than 408/429) is final: the service will not take
this job's samples, so the reporter stops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hpcserve.model.telemetry import GpuSample

REPORT_PATH = "/v1/telemetry"
MAX_SAMPLES_PER_CALL = 256  # the service's limit per call
MAX_BUFFERED = 2048  # about 2 h of 4 GPUs at 15 s: a service down longer loses the oldest samples
MAX_RETRY_DELAY_S = 300.0


@dataclass(frozen=True, slots=True)
class ReplicaIdentity:
    """A replica reports with its deployment, index and secret (``Authorization: Replica <secret>``)."""

    deployment: str
    index: int
    secret: str = field(repr=False)


class Outcome(Enum):
    SENT = "sent"
    RETRY = "retry"  # the service could not be reached, or failed: keep the samples, try later
    REFUSED = "refused"  # the service refused this job's samples: stop reporting


def sample_json(sample: GpuSample) -> dict[str, Any]:
    """One sample as the report API takes it (``job_id`` is the body's, not the sample's)."""
    return {
        "at": sample.at.isoformat(),
        "gpu_uuid": sample.gpu_uuid,
        "gpu_index": sample.gpu_index,
        "util_pct": sample.util_pct,
        "mem_used_bytes": sample.mem_used_bytes,
        "mem_total_bytes": sample.mem_total_bytes,
        "power_w": sample.power_w,
        "sm_clock_mhz": sample.sm_clock_mhz,
    }


def report_bodies(
    job_id: str, samples: Sequence[GpuSample], replica: ReplicaIdentity | None = None
) -> list[dict[str, Any]]:
    """The bodies that carry ``samples``, in order, ``MAX_SAMPLES_PER_CALL`` at most each."""
    extra: dict[str, Any] = (
        {} if replica is None else {"deployment": replica.deployment, "index": replica.index}
    )
    return [
        {
            "job_id": job_id,
            "samples": [sample_json(s) for s in samples[i : i + MAX_SAMPLES_PER_CALL]],
            **extra,
        }
        for i in range(0, len(samples), MAX_SAMPLES_PER_CALL)
    ]


def report_headers(replica: ReplicaIdentity | None) -> dict[str, str]:
    """A replica's secret; nothing for other jobs (the kernel or munge says who calls)."""
    return {} if replica is None else {"Authorization": f"Replica {replica.secret}"}


def outcome_of(status: int | None) -> Outcome:
    """What an answer means for the reporter; ``status`` None: no answer (unreachable, timed out)."""
    if status is not None and 200 <= status < 300:
        return Outcome.SENT
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return Outcome.REFUSED
    return Outcome.RETRY


def retry_delay_s(interval_s: float, failures: int) -> float:
    """How long to wait after ``failures`` failed reports in a row before the next try."""
    return min(MAX_RETRY_DELAY_S, max(interval_s, 1.0) * 2.0 ** min(failures, 16))


def keep_newest(samples: Sequence[GpuSample], cap: int = MAX_BUFFERED) -> list[GpuSample]:
    """The buffer after adding samples: the newest ``cap``."""
    return list(samples[-cap:]) if cap > 0 else []
