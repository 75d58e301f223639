"""The report's data: typed records, their JSON (``GET /v1/report-data``), and the pure bucketing of the
store's samples into one time series per partition and per deployment.

Pure: no I/O (import-linter's ``decisions-pure`` contract). The service reads the store
(``hpcserve.api.report``), turns rows into ``Reading`` values and calls ``build_report``; the CLI parses the
JSON back with ``from_json`` and renders it locally. A week of 30-second samples is ~60,000 rows: the
service sends ~``DEFAULT_POINTS`` means per series instead.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from hpcserve.errors import HpcserveError
from hpcserve.model.telemetry import IdleFlag
from hpcserve.report import MAX_POINTS
from hpcserve.telemetry.idle import flag_from_json, flag_to_json

if TYPE_CHECKING:
    from hpcserve.store.records import Rollup

MIN_BUCKET_S = 30.0  # the sampler's default interval: finer buckets would hold no more than one sample
QUEUE_KEYS = ("running_gpus", "idle_gpus", "total_gpus", "pending_jobs", "pending_gpus")
ENGINE_KEYS = ("ttft_p50", "ttft_p95", "waiting", "gateway_waiting")
Value = float | None
ROLE_ORDER = ("training", "inference", "shared")


# ------------------------------------------------------------------------------------------ records


@dataclass(frozen=True, slots=True)
class PartitionPoint:
    """A partition's mean GPUs and queue over one bucket (``at``: its start)."""

    at: datetime
    running_gpus: float
    idle_gpus: float
    total_gpus: float
    pending_jobs: float
    pending_gpus: float


@dataclass(frozen=True, slots=True)
class PartitionSeries:
    name: str
    role: str | None  # training, inference, shared; None: a partition the site config does not name
    points: tuple[PartitionPoint, ...]

    def allocated_pct(self) -> float | None:
        """Allocated (running) GPUs over all GPUs, over the whole period; None without GPUs."""
        total = sum(p.total_gpus for p in self.points)
        return None if total <= 0 else 100.0 * sum(p.running_gpus for p in self.points) / total

    def idle_gpu_hours(self, bucket_s: float) -> float:
        """GPU-hours no job held (idle GPUs x time), over the buckets with samples."""
        return sum(p.idle_gpus for p in self.points) * bucket_s / 3600

    def peak_pending_gpus(self) -> float:
        return max((p.pending_gpus for p in self.points), default=0.0)


@dataclass(frozen=True, slots=True)
class BusyPoint:
    """How busy the GPUs of one kind of job were over one bucket: their mean NVML utilisation (0..100)."""

    at: datetime
    util_pct: float


@dataclass(frozen=True, slots=True)
class BusySeries:
    kind: str  # training | inference
    points: tuple[BusyPoint, ...]
    mean_pct: float  # over the whole period, each job weighed by its GPUs


@dataclass(frozen=True, slots=True)
class SplitPoint:
    """Nodes per side from ``at`` on (the lending split)."""

    at: datetime
    training_nodes: int
    inference_nodes: int


@dataclass(frozen=True, slots=True)
class DeploymentPoint:
    """A deployment over one bucket: its replicas' mean TTFT percentiles (seconds) and the mean number of
    requests waiting (engines' queues plus the gateway's buffer)."""

    at: datetime
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    waiting: float | None


@dataclass(frozen=True, slots=True)
class DeploymentSeries:
    name: str
    owner: str
    points: tuple[DeploymentPoint, ...]


@dataclass(frozen=True, slots=True)
class UsageRow:
    """GPU-hours and cost of one account (or user, deployment...: ``UsageTable.by``)."""

    key: str
    gpu_hours: float
    cost: float
    busy_gpu_hours: float | None = None
    idle_gpu_hours: float | None = None
    tokens: int | None = None


@dataclass(frozen=True, slots=True)
class UsageTable:
    by: str
    currency: str
    rows: tuple[UsageRow, ...]


@dataclass(frozen=True, slots=True)
class ReportData:
    """Everything the page shows. ``everyone``: the viewer is an admin and sees every user's data; else
    deployments, idle jobs and usage are the viewer's own (partitions and the split are cluster facts that
    squeue shows everyone). ``idle_jobs``/``usage`` None: no data source; their notes say why in words."""

    generated_at: datetime
    since: datetime
    until: datetime
    bucket_s: float
    viewer: str
    everyone: bool
    lending_mode: str
    roles: Mapping[str, str]  # role -> partition name
    partitions: tuple[PartitionSeries, ...]
    busy: tuple[BusySeries, ...]  # the jobs' GPU telemetry: every job's for an admin, else the viewer's
    split: tuple[SplitPoint, ...]
    evictions: int
    lost_gpu_h: float
    deployments: tuple[DeploymentSeries, ...]
    idle_jobs: tuple[IdleFlag, ...] | None
    idle_note: str
    usage: UsageTable | None
    usage_note: str


# ---------------------------------------------------------------------------------------- bucketing


@dataclass(frozen=True, slots=True)
class Reading:
    """One raw sample, or one rollup's means, of the series ``key`` at ``at``, weighing ``weight``
    samples."""

    key: Hashable
    at: datetime
    values: Mapping[str, Value]
    weight: int = 1


@dataclass(frozen=True, slots=True)
class Bucket:
    """The weighted means of one series over ``[at, at + width)``; ``weight``: the samples in it."""

    at: datetime
    means: Mapping[str, Value]
    weight: int


def bucket_width(since: datetime, until: datetime, points: int) -> float:
    """Seconds per bucket: the period in ``points`` buckets, never under ``MIN_BUCKET_S``."""
    if not 1 <= points <= MAX_POINTS:
        raise ValueError(f"points: {points} is not between 1 and {MAX_POINTS}")
    return max(MIN_BUCKET_S, (until - since).total_seconds() / points)


def bucketed(readings: Iterable[Reading], since: datetime, width_s: float) -> dict[Hashable, list[Bucket]]:
    """Per key, the buckets that have readings, oldest first; each field's mean over the readings that
    had a value (None when none had)."""
    sums: dict[Hashable, dict[int, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(dict))
    weights: dict[tuple[Hashable, int], int] = defaultdict(int)
    for r in readings:
        index = int((r.at - since).total_seconds() // width_s)
        weights[(r.key, index)] += r.weight
        fields = sums[r.key][index]
        for name, value in r.values.items():
            acc = fields.setdefault(name, [0.0, 0.0])
            if value is not None:
                acc[0] += value * r.weight
                acc[1] += r.weight
    return {
        key: [Bucket(since + timedelta(seconds=i * width_s), _means(fields), weights[(key, i)])
              for i, fields in sorted(by_index.items())]
        for key, by_index in sums.items()
    }  # fmt: skip


def _means(fields: Mapping[str, list[float]]) -> dict[str, Value]:
    return {name: (total / n if n else None) for name, (total, n) in fields.items()}


def bucket_reading(
    key: Hashable, index: int, count: int, means: Mapping[str, Value], since: datetime, width_s: float
) -> Reading:
    """The database's mean over bucket ``index`` (``hpcserve.store.buckets``) as one reading at the
    bucket's middle, weighing its ``count`` samples: it falls in the same bucket here."""
    return Reading(key, since + timedelta(seconds=(index + 0.5) * width_s), means, count)


def rollup_reading(rollup: Rollup, engine: bool) -> Reading:
    """An hourly rollup (raw samples older than the retention window) as one reading at its middle; an
    engine rollup mixes the deployment's replicas, so it stands as one series of its own."""
    names = ENGINE_KEYS if engine else QUEUE_KEYS
    key: Hashable = (rollup.key, "rollup", None) if engine else rollup.key
    at = rollup.bucket_start + timedelta(seconds=rollup.bucket_s / 2)
    return Reading(key, at, {n: rollup.avg.get(n) for n in names}, max(rollup.samples, 1))


def partition_series(
    readings: Iterable[Reading], since: datetime, width_s: float, roles: Mapping[str, str]
) -> tuple[PartitionSeries, ...]:
    """One series per partition (training's, inference's, the shared one, then others by name); buckets
    where a field had no value are left out."""
    role_of = {name: role for role, name in roles.items()}
    order = {role: i for i, role in enumerate(ROLE_ORDER)}
    series = []

    def rank(item: tuple[Hashable, list[Bucket]]) -> tuple[int, str]:
        return order.get(role_of.get(str(item[0]), ""), len(order)), str(item[0])

    for key, buckets in sorted(bucketed(readings, since, width_s).items(), key=rank):
        points = tuple(
            PartitionPoint(b.at, *(float(b.means[k] or 0.0) for k in QUEUE_KEYS))
            for b in buckets
            if all(b.means.get(k) is not None for k in QUEUE_KEYS)
        )
        series.append(PartitionSeries(str(key), role_of.get(str(key)), points))
    return tuple(series)


def busy_series(readings: Iterable[Reading], since: datetime, width_s: float) -> tuple[BusySeries, ...]:
    """Per job kind (``Reading.key``), the GPU-weighted mean utilisation per bucket and overall; readings
    are each job's mean ``util_pct`` over a bucket, weighing its GPUs."""
    kept = list(readings)
    series = []
    order = {role: i for i, role in enumerate(ROLE_ORDER)}
    by_kind = sorted(
        bucketed(kept, since, width_s).items(), key=lambda kv: (order.get(str(kv[0]), 9), str(kv[0]))
    )
    for kind, buckets in by_kind:
        points = tuple(BusyPoint(b.at, float(b.means["util_pct"] or 0.0)) for b in buckets)
        ours = [r for r in kept if r.key == kind and r.values.get("util_pct") is not None]
        mean = sum(float(r.values["util_pct"] or 0.0) * r.weight for r in ours) / sum(r.weight for r in ours)
        series.append(BusySeries(str(kind), points, mean))
    return tuple(series)


def deployment_series(
    readings: Iterable[Reading], since: datetime, width_s: float, owners: Mapping[str, str]
) -> tuple[DeploymentSeries, ...]:
    """One series per deployment of ``owners`` that has readings: per bucket, the replicas' TTFT means
    weighted by their samples, and the sum of every replica's and gateway's mean waiting requests."""
    per_bucket: dict[str, dict[datetime, list[Bucket]]] = defaultdict(lambda: defaultdict(list))
    for key, buckets in bucketed(readings, since, width_s).items():
        assert isinstance(key, tuple)
        for bucket in buckets:
            per_bucket[str(key[0])][bucket.at].append(bucket)
    return tuple(
        DeploymentSeries(name, owners[name], tuple(_deployment_point(at, parts)
                                                   for at, parts in sorted(per_bucket[name].items())))
        for name in sorted(owners) if name in per_bucket
    )  # fmt: skip


def _deployment_point(at: datetime, parts: Sequence[Bucket]) -> DeploymentPoint:
    waiting = [(b.means.get("waiting") or 0.0) + (b.means.get("gateway_waiting") or 0.0)
               for b in parts if b.means.get("waiting") is not None
               or b.means.get("gateway_waiting") is not None]  # fmt: skip
    return DeploymentPoint(
        at, _weighted(parts, "ttft_p50"), _weighted(parts, "ttft_p95"), sum(waiting) if waiting else None
    )


def _weighted(parts: Sequence[Bucket], name: str) -> float | None:
    pairs = [(b.means[name], b.weight) for b in parts if b.means.get(name) is not None]
    total = sum(w for _, w in pairs)
    return sum(float(v or 0.0) * w for v, w in pairs) / total if total else None


# --------------------------------------------------------------------------------------------- JSON


def to_json(report: ReportData) -> dict[str, Any]:
    """The report as JSON: series as rows of numbers, times as ISO 8601."""
    return {
        "generated_at": _iso(report.generated_at), "since": _iso(report.since), "until": _iso(report.until),
        "bucket_s": report.bucket_s, "viewer": report.viewer, "everyone": report.everyone,
        "lending_mode": report.lending_mode, "roles": dict(report.roles),
        "partitions": [{"name": p.name, "role": p.role,
                        "points": [[_iso(x.at), x.running_gpus, x.idle_gpus, x.total_gpus, x.pending_jobs,
                                    x.pending_gpus] for x in p.points]} for p in report.partitions],
        "busy": [{"kind": b.kind, "mean_pct": b.mean_pct,
                  "points": [[_iso(x.at), x.util_pct] for x in b.points]} for b in report.busy],
        "split": [[_iso(s.at), s.training_nodes, s.inference_nodes] for s in report.split],
        "evictions": report.evictions, "lost_gpu_h": report.lost_gpu_h,
        "deployments": [{"name": d.name, "owner": d.owner,
                         "points": [[_iso(x.at), x.ttft_p50_s, x.ttft_p95_s, x.waiting] for x in d.points]}
                        for d in report.deployments],
        "idle_jobs": None if report.idle_jobs is None else [flag_to_json(j) for j in report.idle_jobs],
        "idle_note": report.idle_note,
        "usage": None if report.usage is None else usage_json(report.usage),
        "usage_note": report.usage_note,
    }  # fmt: skip


def usage_json(table: UsageTable) -> dict[str, Any]:
    rows = [{"key": r.key, "gpu_hours": r.gpu_hours, "cost": r.cost, "busy_gpu_hours": r.busy_gpu_hours,
             "idle_gpu_hours": r.idle_gpu_hours, "tokens": r.tokens} for r in table.rows]  # fmt: skip
    return {"by": table.by, "currency": table.currency, "rows": rows}


def from_json(data: Mapping[str, Any]) -> ReportData:
    """The report back from its JSON; an ``HpcserveError`` naming the field when it does not fit."""
    try:
        return _from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise HpcserveError(
            f"the service's report data does not fit this CLI ({type(exc).__name__}: {exc}) "
            "(fix: use the hpcserve version the service runs)"
        ) from None


def _from_json(d: Mapping[str, Any]) -> ReportData:
    return ReportData(
        generated_at=_time(d["generated_at"]), since=_time(d["since"]), until=_time(d["until"]),
        bucket_s=float(d["bucket_s"]), viewer=str(d["viewer"]), everyone=bool(d["everyone"]),
        lending_mode=str(d["lending_mode"]), roles={str(k): str(v) for k, v in d["roles"].items()},
        partitions=tuple(PartitionSeries(p["name"], p["role"], tuple(
            PartitionPoint(_time(x[0]), *map(float, x[1:6])) for x in p["points"])) for p in d["partitions"]),
        busy=tuple(BusySeries(b["kind"], tuple(BusyPoint(_time(at), float(u)) for at, u in b["points"]),
                              float(b["mean_pct"])) for b in d["busy"]),
        split=tuple(SplitPoint(_time(at), int(t), int(i)) for at, t, i in d["split"]),
        evictions=int(d["evictions"]), lost_gpu_h=float(d["lost_gpu_h"]),
        deployments=tuple(DeploymentSeries(x["name"], x["owner"], tuple(
            DeploymentPoint(_time(p[0]), *(None if v is None else float(v) for v in p[1:4]))
            for p in x["points"])) for x in d["deployments"]),
        idle_jobs=None if d["idle_jobs"] is None else tuple(flag_from_json(j) for j in d["idle_jobs"]),
        idle_note=str(d["idle_note"]),
        usage=None if d["usage"] is None else _usage(d["usage"]), usage_note=str(d["usage_note"]),
    )  # fmt: skip


def _usage(u: Mapping[str, Any]) -> UsageTable:
    rows = tuple(
        UsageRow(str(r["key"]), float(r["gpu_hours"]), float(r["cost"]), _opt(r.get("busy_gpu_hours")),
                 _opt(r.get("idle_gpu_hours")), None if r.get("tokens") is None else int(r["tokens"]))
        for r in u["rows"]
    )  # fmt: skip
    return UsageTable(str(u["by"]), str(u["currency"]), rows)


def _opt(value: Any) -> float | None:
    return None if value is None else float(value)


def _iso(at: datetime) -> str:
    return at.isoformat()


def _time(text: Any) -> datetime:
    at = datetime.fromisoformat(str(text))
    if at.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    return at
