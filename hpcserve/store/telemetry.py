"""GPU telemetry (``gpu_samples``): readings of each GPU of a job, written in batches, read by time window,
job and user; the newest reading of each GPU; and each job's mean utilisation over a window.

Two sources write here: the in-job NVML sampler through ``POST /v1/telemetry`` ("nvml") and sacct's
``gres/gpuutil`` ("sacct"). Where a job has both, ``job_utilisation`` trusts NVML: it samples the whole
job, while sacct's figure is slurmd's own average.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, delete, func, insert, or_, select

from hpcserve.model.telemetry import JOB_KINDS, GpuSample
from hpcserve.store.records import GpuSampleRecord, check_state
from hpcserve.store.schema import EngineSampleRow, GpuSampleRow
from hpcserve.store.sql import select_record, to_records, within

G = GpuSampleRow
SOURCES = ("nvml", "sacct")


def add_gpu_samples(
    conn: Connection, samples: Iterable[GpuSample], user: str, kind: str, deployment: str | None, source: str
) -> int:
    """Insert ``samples`` of ``user``'s job (one executemany); how many there were."""
    meta = {"user": user, "kind": check_state("job kind", kind, JOB_KINDS),
            "deployment": deployment, "source": check_state("telemetry source", source, SOURCES)}  # fmt: skip
    values = [_row(sample) | meta for sample in samples]
    if values:
        conn.execute(insert(G), values)
    return len(values)


def _row(s: GpuSample) -> dict[str, Any]:
    return {"at": s.at, "job_id": s.job_id, "gpu_uuid": s.gpu_uuid, "gpu_index": s.gpu_index,
            "util_pct": s.util_pct, "mem_used_bytes": s.mem_used_bytes, "mem_total_bytes": s.mem_total_bytes,
            "power_w": s.power_w, "sm_clock_mhz": s.sm_clock_mhz}  # fmt: skip


def gpu_samples(
    conn: Connection, since: datetime | None, until: datetime | None = None,
    job_ids: Collection[str] | None = None, user: str | None = None,
) -> list[GpuSampleRecord]:  # fmt: skip
    """Readings in ``[since, until)`` (of ``job_ids`` and/or ``user`` when given), oldest first."""
    stmt = _filtered(within(select_record(G, GpuSampleRecord), G.at, since, until), job_ids, user)
    return to_records(conn.execute(stmt.order_by(G.at, G.job_id, G.gpu_index, G.id)), GpuSampleRecord)


def latest_gpu_samples(
    conn: Connection, since: datetime, job_ids: Collection[str] | None = None, user: str | None = None
) -> list[GpuSampleRecord]:
    """The newest reading of each GPU (job, index) since ``since``, by job and GPU index."""
    keys = (G.job_id, G.gpu_index)
    newest = _filtered(select(*keys, func.max(G.at).label("at")).where(G.at >= since), job_ids, user)
    newest_sq = newest.group_by(*keys).subquery()
    on = and_(G.job_id == newest_sq.c.job_id, G.gpu_index == newest_sq.c.gpu_index, G.at == newest_sq.c.at)
    stmt = select_record(G, GpuSampleRecord).join(newest_sq, on).order_by(G.job_id, G.gpu_index, G.id)
    by_gpu = {(r.job_id, r.gpu_index): r for r in to_records(conn.execute(stmt), GpuSampleRecord)}
    return list(by_gpu.values())  # two sources at one instant: the last row written wins


def job_utilisation(conn: Connection, since: datetime, until: datetime | None = None) -> dict[str, float]:
    """Each job's mean ``util_pct`` over its readings in ``[since, until)``, every GPU alike; from NVML
    where the job has NVML readings, else from sacct's."""
    stmt = within(select(G.job_id, G.source, func.avg(G.util_pct)), G.at, since, until)
    found: dict[str, dict[str, float]] = {}
    for job_id, source, mean in conn.execute(stmt.group_by(G.job_id, G.source)):
        found.setdefault(str(job_id), {})[str(source)] = float(mean)
    return {job: by_source.get("nvml", by_source.get("sacct", 0.0)) for job, by_source in found.items()}


def last_requests(
    conn: Connection, deployments: Collection[str], since: datetime
) -> dict[tuple[str, int], datetime]:
    """When each replica of ``deployments`` was last seen serving (a request running or waiting on its
    engine, or tokens flowing), from the engine samples since ``since``: by (deployment, replica index)."""
    E = EngineSampleRow
    busy = or_(E.running > 0, E.waiting > 0, E.tokens_per_s > 0)
    stmt = (
        select(E.deployment, E.replica, func.max(E.at))
        .where(E.deployment.in_(list(deployments)), E.replica.is_not(None), E.at >= since, busy)
        .group_by(E.deployment, E.replica)
    )
    return {(str(d), int(r or 0)): at for d, r, at in conn.execute(stmt)}


def delete_gpu_samples(conn: Connection, before: datetime) -> int:
    """Forget readings older than ``before``; how many went."""
    return int(conn.execute(delete(G).where(G.at < before)).rowcount)


def _filtered(stmt: Any, job_ids: Collection[str] | None, user: str | None) -> Any:
    if job_ids is not None:
        stmt = stmt.where(G.job_id.in_(list(job_ids)))
    if user is not None:
        stmt = stmt.where(G.user == user)
    return stmt
