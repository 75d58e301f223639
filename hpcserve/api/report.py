"""The data of ``hpcserve report`` behind ``GET /v1/report-data?since_s=&points=``.

What each caller sees follows the other reads: partitions' queue samples, the lending split and the
evictions are cluster facts every user may read (``hpcserve history``); deployments' engine samples
(TTFT, waiting requests), idle jobs and usage are the caller's own, every user's for an admin (``admins``
in the service's site config). Idle jobs come from ``hpcserve.api.telemetry.idle_jobs`` and usage from
``hpcserve.api.usage`` (sacct): when sacct cannot be read, the answer says so in words.

The service buckets the samples (``hpcserve.report.data``) so a week of 30-second samples arrives as a few
hundred means per series; the CLI draws the page itself.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from hpcserve.api.caller import is_admin
from hpcserve.errors import HpcserveError, ValidationError
from hpcserve.report import DEFAULT_POINTS, MAX_POINTS
from hpcserve.report import data as rd

if TYPE_CHECKING:
    from hpcserve.api.caller import Caller
    from hpcserve.api.context import ApiContext
    from hpcserve.model.telemetry import IdleFlag

USAGE_NOTE = (
    "GPU-hours: sacct's allocated GPUs x time in the period. Busy/idle: from each job's GPU "
    "telemetry; jobs without any count in neither."
)
MAX_SINCE_S = 400 * 86400.0  # rollups are kept 180 days by default; a little over a year is the most asked


def report_data(
    api: ApiContext, caller: Caller, since_s: float, points: int = DEFAULT_POINTS
) -> dict[str, Any]:
    """The report's data for the last ``since_s`` seconds, in about ``points`` buckets, as JSON."""
    if not 0 < since_s <= MAX_SINCE_S:
        raise ValidationError(
            f"since_s: {since_s:.0f} seconds is out of range "
            f"(fix: more than 0, at most {MAX_SINCE_S / 86400:.0f} days, e.g. --since 7d)"
        )
    if not 1 <= points <= MAX_POINTS:
        raise ValidationError(f"points: {points} is out of range (fix: 1 to {MAX_POINTS})")
    until = api.clock()
    since = until - timedelta(seconds=since_s)
    width = rd.bucket_width(since, until, points)
    everyone = is_admin(caller, api.site.admins)
    idle, idle_note = _idle_jobs(api, caller)
    usage, usage_note = _usage(api, caller, since_s)
    lost = api.store.lost_work(since=since)
    report = rd.ReportData(
        generated_at=until, since=since, until=until, bucket_s=width, viewer=caller.user, everyone=everyone,
        lending_mode=api.site.lending.mode, roles=api.site.partition_names(),
        partitions=_partitions(api, since, until, width), split=_split(api, since),
        busy=_busy(api, caller, everyone, since, until, width),
        evictions=len(lost), lost_gpu_h=round(sum(r.lost_gpu_h for r in lost), 3),
        deployments=_deployments(api, caller, everyone, since, until, width),
        idle_jobs=idle, idle_note=idle_note, usage=usage, usage_note=usage_note,
    )  # fmt: skip
    return rd.to_json(report)


def _partitions(
    api: ApiContext, since: datetime, until: datetime, width: float
) -> tuple[rd.PartitionSeries, ...]:
    """Each partition's queue: the database's bucket means of the raw samples, and the hourly rollups of
    samples older than the retention window."""
    from hpcserve.store.buckets import queue_buckets

    readings = [rd.bucket_reading(row.key[0], row.index, row.count, row.means, since, width)
                for row in queue_buckets(api.store, since, until, width)]  # fmt: skip
    readings += [rd.rollup_reading(r, engine=False) for r in api.store.queue_rollups(since=since)]
    return rd.partition_series(readings, since, width, api.site.partition_names())


def _busy(
    api: ApiContext, caller: Caller, everyone: bool, since: datetime, until: datetime, width: float
) -> tuple[rd.BusySeries, ...]:
    """How busy the jobs' GPUs were (their NVML telemetry), per kind: every job's for an admin, the
    caller's own otherwise. One ``job_utilisation`` per bucket (an indexed range each), never every
    reading of a month at once."""
    latest = api.store.latest_gpu_samples(since, user=None if everyone else caller.user)
    kind = {r.job_id: r.kind for r in latest}
    gpus = Counter(r.job_id for r in latest)
    readings = []
    start = since
    while kind and start < until:
        end = min(start + timedelta(seconds=width), until)
        middle = start + (end - start) / 2
        means = api.store.job_utilisation(start, end)
        readings += [
            rd.Reading(kind[j], middle, {"util_pct": u}, gpus[j]) for j, u in means.items() if j in kind
        ]
        start = end
    return rd.busy_series(readings, since, width)


def _split(api: ApiContext, since: datetime) -> tuple[rd.SplitPoint, ...]:
    from hpcserve.api.admin import split_points

    return tuple(rd.SplitPoint(at, t, i) for at, t, i in split_points(api.site, api.store, since))


def _deployments(
    api: ApiContext, caller: Caller, everyone: bool, since: datetime, until: datetime, width: float
) -> tuple[rd.DeploymentSeries, ...]:
    """The caller's deployments (everyone's for an admin) that have engine samples in the period."""
    from hpcserve.store.buckets import engine_buckets

    owners = {d.name: d.owner for d in api.store.list_deployments() if everyone or d.owner == caller.user}
    readings = [rd.bucket_reading(row.key, row.index, row.count, row.means, since, width)
                for row in engine_buckets(api.store, owners, since, until, width)]  # fmt: skip
    for name in owners:
        readings += [rd.rollup_reading(r, engine=True) for r in api.store.engine_rollups(name, since=since)]
    return rd.deployment_series(readings, since, width, owners)


def _idle_jobs(api: ApiContext, caller: Caller) -> tuple[tuple[IdleFlag, ...], str]:
    """The jobs flagged idle now that the caller may see (``hpcserve.api.telemetry.idle_jobs``: every
    user's for an admin, the caller's own otherwise), and what an empty list means."""
    from hpcserve.api.telemetry import FLAGS_STALE_S, idle_jobs

    flags = idle_jobs(api, caller)
    jobs = tuple(flags)
    policy = api.policy.idle
    note = (f"A job is flagged when its GPUs average under {policy.gpu_util_below_pct:g}% for "
            f"{policy.window_s / 60:g} min (or a replica serves nothing that long); flags older than "
            f"{FLAGS_STALE_S // 60} min are not shown.")  # fmt: skip
    return jobs, note


def _usage(api: ApiContext, caller: Caller, since_s: float) -> tuple[rd.UsageTable | None, str]:
    """GPU-hours and cost per account over the period (``hpcserve.api.usage``, sacct's figures): the
    caller's jobs, every user's for an admin, as ``hpcserve usage --by account`` shows them."""
    from hpcserve.api.usage import UsageQuery, usage

    try:
        view = usage(api, caller, UsageQuery(since_s=since_s, by="account"))
    except HpcserveError as exc:
        return None, f"usage could not be read: {exc}"
    rows = tuple(
        rd.UsageRow(str(g["group"]) or "(none)", float(g["gpu_hours"]), float(g["cost"]),
                    g.get("busy_gpu_hours"), g.get("idle_gpu_hours"), g.get("tokens"))
        for g in view["groups"]
    )  # fmt: skip
    return rd.UsageTable(str(view["by"]), str(view["currency"]), rows), USAGE_NOTE
