"""``GET /v1/usage``: GPU-hours, cost and tokens per user, account, deployment, key or partition.

Who sees what: an admin (the service's ``admins``) every user's jobs and keys; anyone else only their own.
The service asks sacct for the caller's jobs only (``--user`` = the kernel's or munge's name for the caller,
never a name from the request) and reads only the caller's keys' counters, plus, per deployment or
account, the traffic on deployments the caller owns. One sacct read per request; the rest is the store.
The figures are made in ``hpcserve.usage.compute`` (pure); its docstring says how.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from hpcserve.api.caller import Caller, is_admin
from hpcserve.errors import HpcserveError, ValidationError
from hpcserve.usage.compute import (
    GROUP_BY,
    DeploymentInfo,
    EngineMark,
    GroupBy,
    JobUsage,
    TokenRow,
    UsageGroup,
    UsageInputs,
    UsageReport,
    classify,
    usage_report,
    visible_tokens,
)

if TYPE_CHECKING:
    from hpcserve.api.context import ApiContext
    from hpcserve.model.usage import GpuAllocation

MAX_SINCE_S = 3660 * 86400
DEFAULT_SINCE_S = 30 * 86400
QUERY_FIELDS = ("since_s", "by", "hpcserve_only", "jobs")
NOTES = (
    "GPU-hours: allocated GPUs (sacct AllocTRES gres/gpu) x seconds inside the window; a job that overlaps "
    "the window's start counts only its time inside it; each run of a requeued job counts",
    "busy/idle: each job's mean GPU utilisation from hpcserve's telemetry; a job without it is unknown",
    "served nothing: replica GPU-hours whose engine samples showed no request running or waiting; time no "
    "sample covers (start-up, weights loading, sampling gaps) is unobserved",
    "tokens: the gateway's counters per key, deployment and UTC day (the window's first day counts whole)",
)


@dataclass(frozen=True, slots=True)
class UsageQuery:
    since_s: float = DEFAULT_SINCE_S
    by: GroupBy = "user"
    hpcserve_only: bool = False
    jobs: bool = False  # list each run too


def parse_usage_query(query: Mapping[str, str]) -> UsageQuery:
    """A ``UsageQuery`` from the URL's query; ``ValidationError`` naming the field and the fix otherwise."""
    unknown = sorted(set(query) - set(QUERY_FIELDS))
    if unknown:
        raise ValidationError(f"unknown usage parameters {unknown}: use {', '.join(QUERY_FIELDS)}")
    since_s = float(DEFAULT_SINCE_S)
    if "since_s" in query:
        try:
            since_s = float(query["since_s"])
        except ValueError:
            since_s = -1.0
        if not 0 < since_s <= MAX_SINCE_S:
            raise ValidationError(
                f"since_s: {query['since_s']!r} is not a number of seconds (fix: 1 to {MAX_SINCE_S})"
            )
    by = query.get("by", "user")
    for choice in GROUP_BY:
        if by == choice:
            return UsageQuery(since_s, choice, _flag(query, "hpcserve_only"), _flag(query, "jobs"))
    raise ValidationError(f"by: {by!r} is not a grouping (fix: one of {', '.join(GROUP_BY)})")


def _flag(query: Mapping[str, str], name: str) -> bool:
    value = query.get(name, "0").lower()
    if value not in ("0", "1", "true", "false", "yes", "no"):
        raise ValidationError(f"{name}: {value!r} is not a flag (fix: 1 or 0)")
    return value in ("1", "true", "yes")


def usage(api: ApiContext, caller: Caller, query: UsageQuery) -> dict[str, Any]:
    """The report the caller may see, as JSON."""
    admin = is_admin(caller, api.site.admins)
    until = api.clock().replace(microsecond=0)
    since = until - timedelta(seconds=query.since_s)
    runs = _allocations(api, since, until, None if admin else caller.user)
    deployments = {d.name: DeploymentInfo(d.owner, d.account) for d in api.store.list_deployments()}
    replica_jobs = {r.job_id: (r.deployment, r.index) for r in api.store.replicas() if r.job_id}
    owners = {key.id: key.owner for key in api.store.api_keys()}
    rows = [TokenRow(u.key_id, owners.get(u.key_id, ""), u.model, u.day, u.requests, u.prompt_tokens,
                     u.completion_tokens) for u in api.store.usage_of(None, since.date())]  # fmt: skip
    mine = [name for name, info in deployments.items() if info.owner == caller.user]
    inputs = UsageInputs(
        since, until, runs, api.site.cost.price, replica_jobs, deployments,
        visible_tokens(rows, None if admin else caller.user, mine, query.by),
        _utilisation(api, since, until), _engine_marks(api, runs, replica_jobs, deployments, since, until),
        {node: api.site.gpu_type_of(node) for run in runs for node in run.nodes},
        cover_s=max(3 * api.site.serving.controller_interval_s, 10.0), hpcserve_only=query.hpcserve_only,
    )  # fmt: skip
    report = usage_report(inputs, query.by)
    view = report_view(report, since, until, api.site.cost.currency, everyone=admin, user=caller.user)
    return view if query.jobs else {k: v for k, v in view.items() if k != "jobs"}


def _allocations(api: ApiContext, since: datetime, until: datetime, user: str | None) -> list[GpuAllocation]:
    from hpcserve.slurm.protocol import UsageReader

    if not isinstance(api.slurm, UsageReader):
        raise HpcserveError("this service's Slurm backend cannot read accounting (set `slurm.backend: cli`)")
    return api.slurm.gpu_allocations(since, until, user)


def _utilisation(api: ApiContext, since: datetime, until: datetime) -> dict[str, float]:
    """Each job's mean GPU utilisation from the telemetry store, where the store has it."""
    read = getattr(api.store, "job_utilisation", None)
    return dict(read(since, until)) if read is not None else {}


def _engine_marks(
    api: ApiContext,
    runs: list[GpuAllocation],
    replica_jobs: Mapping[str, tuple[str, int]],
    deployments: Mapping[str, DeploymentInfo],
    since: datetime,
    until: datetime,
) -> dict[tuple[str, int], list[EngineMark]]:
    """Engine samples of each replica run, read for its own time inside the window."""
    marks: dict[tuple[str, int], list[EngineMark]] = {}
    for run in runs:
        replica = classify(run, replica_jobs, deployments)
        if replica is None or run.start is None or run.gpus <= 0:
            continue
        low = max(run.start, since)
        high = min(run.start + timedelta(seconds=run.elapsed_s), until)
        if high <= low:
            continue
        found = api.store.engine_samples(replica[0], since=low, until=high)
        marks.setdefault(replica, []).extend(
            EngineMark(s.at, bool(s.running or s.waiting)) for s in found if s.replica == replica[1]
        )
    return {key: sorted(values, key=lambda m: m.at) for key, values in marks.items()}


def report_view(
    report: UsageReport, since: datetime, until: datetime, currency: str, *, everyone: bool, user: str
) -> dict[str, Any]:
    return {
        "since": since.isoformat(), "until": until.isoformat(), "by": report.by, "currency": currency,
        "scope": "everyone" if everyone else user, "groups": [group_view(g) for g in report.groups],
        "total": group_view(report.total), "jobs": [job_view(j) for j in report.jobs], "notes": list(NOTES),
    }  # fmt: skip


def group_view(group: UsageGroup) -> dict[str, Any]:
    hours = 1 / 3600
    return {
        "group": group.group, "jobs": group.jobs, "gpu_seconds": group.gpu_seconds,
        "gpu_hours": round(group.gpu_seconds * hours, 6),
        "training_gpu_hours": round(group.training_gpu_seconds * hours, 6),
        "inference_gpu_hours": round(group.inference_gpu_seconds * hours, 6),
        "busy_gpu_hours": round(group.busy_gpu_seconds * hours, 6),
        "idle_gpu_hours": round(group.idle_gpu_seconds * hours, 6),
        "unknown_util_gpu_hours": round(group.unknown_util_gpu_seconds * hours, 6),
        "served_nothing_gpu_hours": round(group.served_nothing_gpu_seconds * hours, 6),
        "unobserved_replica_gpu_hours": round(group.unobserved_replica_gpu_seconds * hours, 6),
        "cost": round(group.cost, 6), "requests": group.requests, "prompt_tokens": group.prompt_tokens,
        "completion_tokens": group.completion_tokens, "tokens": group.tokens,
        "cost_per_million_tokens": _rounded(group.cost_per_million_tokens()),
    }  # fmt: skip


def job_view(job: JobUsage) -> dict[str, Any]:
    return {
        "job_id": job.job_id, "user": job.user, "account": job.account, "partition": job.partition,
        "kind": job.kind, "deployment": job.deployment, "hpcserve": job.hpcserve, "gpus": job.gpus,
        "gpu_seconds": job.gpu_seconds, "cost": round(job.cost, 6),
        "busy_gpu_seconds": _rounded(job.busy_gpu_seconds),
    }  # fmt: skip


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
