"""GPU telemetry through the API: jobs report their GPUs' readings, users read their jobs' latest, admins
list idle jobs.

``POST /v1/telemetry`` (``{"job_id", "samples": [...], "deployment", "index"}``) is believed only from:
- a replica, with ``Authorization: Replica <secret>``: the secret the service issued for exactly that replica
  (constant-time, as its announcement), and ``job_id`` the replica's recorded job. Stored as the
  deployment owner's, kind "inference";
- the job's own user: the caller the kernel (Unix socket) or munge (TCP) vouches for must be the Slurm owner
  of ``job_id``, and the job must be running (``hpcserve.api.job_owners``: from what was verified in the
  last minutes or the service's last squeue; one filtered squeue only for a job seen for the first time).
Anything else is refused (403) in one line; a bad body is a 400 naming the field. At most
``MAX_SAMPLES`` readings per call.

Idle flags are decided by the service's idle tick (``hpcserve.service.idle_tick``), which keeps the current
ones in the service state ``FLAGS_STATE``; the API only reads them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from hpcserve.api.caller import is_admin
from hpcserve.api.errors import Forbidden
from hpcserve.api.replicas import secret_matches
from hpcserve.errors import ValidationError
from hpcserve.model.telemetry import GpuSample, IdleFlag

if TYPE_CHECKING:
    from hpcserve.api.caller import Caller
    from hpcserve.api.context import ApiContext
    from hpcserve.store import GpuSampleRecord

MAX_SAMPLES = 256
MAX_FUTURE_S = 300  # a reading from further ahead than this is a clock gone wrong
LATEST_S = 600  # GET /v1/telemetry/jobs: readings at most this old
FLAGS_STATE = "telemetry:idle"
FLAGS_STALE_S = 900  # flags the idle tick wrote longer ago than this are not served (no tick is running)
_JOB_ID = re.compile(r"^[0-9]+(_[0-9]+)?$")
_UUID_CHARS = 96


@dataclass(frozen=True, slots=True)
class Report:
    """``POST /v1/telemetry``'s body, checked."""

    job_id: str
    samples: tuple[GpuSample, ...]
    deployment: str | None = None
    index: int | None = None


def parse_report(body: Mapping[str, Any], now: datetime) -> Report:
    """The body's fields, checked; a one-line ValidationError (400) naming the field otherwise."""
    job_id, samples = body.get("job_id"), body.get("samples")
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise ValidationError(f'job_id: expected a Slurm job id like "123", got {job_id!r}')
    if not isinstance(samples, list) or not 1 <= len(samples) <= MAX_SAMPLES:
        got = f"{len(samples)} samples" if isinstance(samples, list) else repr(samples)
        raise ValidationError(f"samples: expected a list of 1 to {MAX_SAMPLES} readings, got {got} "
                              "(fix: send more calls)")  # fmt: skip
    deployment, index = body.get("deployment"), body.get("index")
    if deployment is not None and (not isinstance(deployment, str) or not deployment):
        raise ValidationError(f"deployment: expected the replica's deployment name, got {deployment!r}")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
        raise ValidationError(f"index: expected the replica's index (0 or more), got {index!r}")
    if (deployment is None) != (index is None):
        raise ValidationError("deployment, index: a replica sends both, any other job neither")
    parsed = tuple(_sample(job_id, i, s, now) for i, s in enumerate(samples))
    return Report(job_id, parsed, deployment, index)


def _sample(job_id: str, i: int, raw: object, now: datetime) -> GpuSample:
    where = f"samples[{i}]"
    if not isinstance(raw, dict):
        raise ValidationError(f"{where}: expected a JSON object")
    return GpuSample(
        at=_time(f"{where}.at", raw.get("at"), now), job_id=job_id,
        gpu_uuid=_uuid(f"{where}.gpu_uuid", raw.get("gpu_uuid", "")),
        gpu_index=_int(f"{where}.gpu_index", raw.get("gpu_index"), 1023),
        util_pct=_number(f"{where}.util_pct", raw.get("util_pct"), 100.0),
        mem_used_bytes=_int(f"{where}.mem_used_bytes", raw.get("mem_used_bytes"), 1 << 60),
        mem_total_bytes=_int(f"{where}.mem_total_bytes", raw.get("mem_total_bytes"), 1 << 60),
        power_w=_optional(_number, f"{where}.power_w", raw.get("power_w"), 100_000.0),
        sm_clock_mhz=_optional(_int, f"{where}.sm_clock_mhz", raw.get("sm_clock_mhz"), 100_000),
    )  # fmt: skip


def _time(field: str, value: object, now: datetime) -> datetime:
    try:
        at = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise ValidationError(f"{field}: expected an ISO 8601 time with its zone, like "
                              f"\"2026-12-07T18:00:00+00:00\", got {value!r}")  # fmt: skip
    if at > now + timedelta(seconds=MAX_FUTURE_S):
        raise ValidationError(f"{field}: {value} is in the future (fix: the node's clock)")
    return at


def _uuid(field: str, value: object) -> str:
    if not isinstance(value, str) or len(value) > _UUID_CHARS or not value.isprintable():
        raise ValidationError(f'{field}: expected NVML\'s "GPU-..." UUID or "", got {value!r}')
    return value


def _int(field: str, value: object, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise ValidationError(f"{field}: expected a whole number from 0 to {high}, got {value!r}")
    return value


def _number(field: str, value: object, high: float) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 <= float(value) <= high:  # type: ignore[arg-type]
        raise ValidationError(f"{field}: expected a number from 0 to {high:g}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _optional(check: Any, field: str, value: object, high: Any) -> Any:
    return None if value is None else check(field, value, high)


def store_report(api: ApiContext, report: Report, secret: str | None, caller: Caller | None) -> int:
    """Store the readings once their sender is proven (see the module docstring); how many were stored."""
    if secret is not None:
        owner = _check_replica(api, report, secret, caller)
        return api.store.add_gpu_samples(report.samples, user=owner, kind="inference",
                                         deployment=report.deployment)  # fmt: skip
    user, kind = _check_owner(api, report, caller)
    return api.store.add_gpu_samples(report.samples, user=user, kind=kind)


def _check_replica(api: ApiContext, report: Report, secret: str, caller: Caller | None) -> str:
    """The deployment's owner, once the secret proves the sender is the replica running ``job_id``."""
    if report.deployment is None or report.index is None:
        raise ValidationError("deployment, index: a report with a replica's secret names its replica")
    who = f"telemetry for job {report.job_id}"
    deployment = api.store.get_deployment(report.deployment)
    replica = None
    if deployment is not None:
        replica = next((r for r in api.store.replicas(deployment.name) if r.index == report.index), None)
    if deployment is None or replica is None or not secret_matches(secret, replica.secret_hash):
        raise Forbidden(f"{who}: unknown replica {report.deployment}:{report.index} or wrong secret")
    if replica.job_id != report.job_id:
        raise Forbidden(f"{who}: it is not the job of replica {report.deployment}:{report.index}")
    if caller is not None and caller.user != deployment.owner:
        raise Forbidden(f"{who}: only its owner's job may report it, not {caller.user}")
    return deployment.owner


def _check_owner(api: ApiContext, report: Report, caller: Caller | None) -> tuple[str, str]:
    """The job's user and kind, once ``caller`` is the Slurm owner of the running job ``job_id``."""
    from hpcserve.telemetry.idle import job_kind

    who = f"telemetry for job {report.job_id}"
    if report.deployment is not None:
        raise Forbidden(f"{who}: a replica reports with its secret (Authorization: Replica <secret>)")
    if caller is None:
        raise Forbidden(f"{who}: no identity (fix: report from the job's user, on the service's socket or "
                        "with munge)")  # fmt: skip
    job = api.job_owners.running(api.slurm, report.job_id)
    if job is None or job.user != caller.user:
        raise Forbidden(f"{who}: not a running job of {caller.user}")
    return job.user, job_kind(job)


def latest_by_job(api: ApiContext, caller: Caller) -> list[dict[str, Any]]:
    """Each job's newest readings (the caller's jobs; every job for an admin): GPU utilisation averaged
    over its GPUs, memory summed, and whether it is flagged idle. Flagged jobs without recent readings are
    listed too."""
    now = api.clock()
    admin = is_admin(caller, api.site.admins)
    user = None if admin else caller.user
    latest = api.store.latest_gpu_samples(now - timedelta(seconds=LATEST_S), user=user)
    flags = {f.job_id: f for f in idle_jobs(api, caller)}
    by_job: dict[str, list[GpuSampleRecord]] = {}
    for record in latest:
        by_job.setdefault(record.job_id, []).append(record)
    rows = [_job_row(job_id, records, flags.get(job_id)) for job_id, records in by_job.items()]
    rows += [_flag_row(flag) for job_id, flag in flags.items() if job_id not in by_job]
    return sorted(rows, key=lambda r: (len(r["job_id"]), r["job_id"]))


def _job_row(job_id: str, records: list[GpuSampleRecord], flag: IdleFlag | None) -> dict[str, Any]:
    first = records[0]
    return {
        "job_id": job_id, "user": first.user, "kind": first.kind, "deployment": first.deployment,
        "at": max(r.at for r in records).isoformat(), "gpus": len(records),
        "util_pct": round(sum(r.util_pct for r in records) / len(records), 1),
        "mem_used_bytes": sum(r.mem_used_bytes for r in records),
        "mem_total_bytes": sum(r.mem_total_bytes for r in records),
        "idle": flag is not None, "idle_reason": flag.reason if flag else None,
    }  # fmt: skip


def _flag_row(flag: IdleFlag) -> dict[str, Any]:
    return {"job_id": flag.job_id, "user": flag.user, "kind": flag.kind, "deployment": None, "at": None,
            "gpus": flag.gpus, "util_pct": flag.mean_util_pct, "mem_used_bytes": None,
            "mem_total_bytes": None, "idle": True, "idle_reason": flag.reason}  # fmt: skip


def idle_jobs(api: ApiContext, caller: Caller) -> list[IdleFlag]:
    """The jobs flagged idle at the idle tick's last run (none if it has not run for ``FLAGS_STALE_S``):
    every job's for an admin, the caller's own otherwise."""
    flags = current_flags(api.store.get_state(FLAGS_STATE), api.clock())
    if is_admin(caller, api.site.admins):
        return flags
    return [f for f in flags if f.user == caller.user]


def admin_idle_jobs(api: ApiContext, caller: Caller) -> dict[str, Any]:
    """``GET /v1/idle``: every flagged job, and the GPU-hours they wasted; admins only."""
    from hpcserve.telemetry.idle import flag_to_json

    if not is_admin(caller, api.site.admins):
        raise Forbidden(f"idle jobs are for admins; {caller.user} is not one (see `hpcserve ps` for yours)")
    flags = idle_jobs(api, caller)
    return {"flags": [flag_to_json(f) for f in flags],
            "gpu_hours_wasted": round(sum(f.gpu_hours_wasted for f in flags), 4),
            "warm": current_warm(api.store.get_state(FLAGS_STATE), api.clock())}  # fmt: skip


def current_warm(state: Mapping[str, Any] | None, now: datetime) -> list[dict[str, Any]]:
    """The replica jobs the idle tick kept apart as warm (engines asleep by design), as it stored them;
    none when its state is older than ``FLAGS_STALE_S``."""
    if not state or not _fresh(state, now):
        return []
    return [dict(w) for w in (state or {}).get("warm", []) if isinstance(w, Mapping)]


def _fresh(state: Mapping[str, Any], now: datetime) -> bool:
    at = state.get("evaluated_at")
    return at is not None and now - datetime.fromisoformat(str(at)) <= timedelta(seconds=FLAGS_STALE_S)


def current_flags(state: Mapping[str, Any] | None, now: datetime) -> list[IdleFlag]:
    """The flags in the idle tick's stored state, unless it is older than ``FLAGS_STALE_S``."""
    from hpcserve.telemetry.idle import flag_from_json

    if not state or "evaluated_at" not in state:
        return []
    if now - datetime.fromisoformat(str(state["evaluated_at"])) > timedelta(seconds=FLAGS_STALE_S):
        return []
    return [flag_from_json(f) for f in state.get("flags", [])]
