"""Which running jobs hold GPUs they do not use: the idle decision. Pure (import-linter checks it): the
service's idle tick (``hpcserve.service.idle_tick``) loads the readings, jobs and replica activity, and
acts on what this returns.

A running job is flagged when either holds:
- **low utilisation**: it ran for the whole window (``idle.window_s``), its GPUs were read throughout it
  (the first reading at most ``sample_gap_s`` after the window began, the last at most that long ago, and no
  two further apart), and their mean ``util_pct`` over the window is under ``gpu_util_below_pct``. A job
  without readings is never flagged for utilisation: no telemetry is not proof of idleness;
- **no requests** (replicas only, ``replica_no_requests_s`` set): nothing was seen running or waiting on its
  engine for that long, counted from its last request, or from its start if it never served one.

A model pool's replica job (its engines wake and sleep by its members' requests) is not judged while a
member was requested within the window, nor while it holds the pool's awake floor (``pool_replicas_in_use``);
an idle pool gives up one replica at a time, never below its awake floor (``pool_scale_target``).

``since`` is when the idle stretch began: the start of the window that first flagged it (a job still flagged
keeps the ``since`` of the last tick), or the replica's last request. **GPU-hours wasted** = the job's GPUs x
the hours since ``since``: the GPU time the job held while flagged, the window that proved it included.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from hpcserve.model.cluster import TAG_PREFIX, Job, JobState
from hpcserve.model.telemetry import GpuSample, IdleFlag
from hpcserve.serving.tags import parse_replica_tag

if TYPE_CHECKING:  # a type only: the rules' pydantic model stays out of the report's import at --help
    from hpcserve.config.policy import IdleRules

INFERENCE_TAG_KINDS = ("replica", "inference")
WARM_TIER = "warm"  # hpcserve.serving.tiers.Tier.WARM: the replica jobs kept, every engine asleep


def job_kind(job: Job) -> str:
    """Kind "inference" for a replica or a job tagged ``hpcserve:inference:...``; "training" otherwise."""
    tag = job.tag or ""
    kind = tag.removeprefix(TAG_PREFIX).split(":", 1)[0] if tag.startswith(TAG_PREFIX) else ""
    return "inference" if kind in INFERENCE_TAG_KINDS or parse_replica_tag(tag) else "training"


def idle_flags(
    samples_by_job: Mapping[str, Sequence[GpuSample]],
    running_jobs: Iterable[Job],
    replica_activity: Mapping[str, datetime | None],
    policy: IdleRules,
    now: datetime,
    *,
    previous: Mapping[str, datetime] | None = None,
) -> list[IdleFlag]:
    """The flags of ``running_jobs`` now, most GPU-hours wasted first.

    ``samples_by_job``: readings by job id (at least the last ``window_s``; older ones are ignored).
    ``replica_activity``: for each replica's job id, when its engine was last seen serving a request (None:
    never). ``previous``: the ``since`` of each job flagged at the last tick, kept while it stays flagged.
    """
    flags = []
    for job in running_jobs:
        if job.state != JobState.RUNNING or job.start is None:
            continue
        flag = _flag(job, samples_by_job.get(job.id, ()), replica_activity, policy, now, previous or {})
        if flag is not None:
            flags.append(flag)
    return sorted(flags, key=lambda f: (-f.gpu_hours_wasted, f.job_id))


def _flag(
    job: Job, samples: Sequence[GpuSample], activity: Mapping[str, datetime | None], policy: IdleRules,
    now: datetime, previous: Mapping[str, datetime],
) -> IdleFlag | None:  # fmt: skip
    assert job.start is not None
    start = now - timedelta(seconds=policy.window_s)
    window = [s for s in samples if start <= s.at <= now]
    mean = sum(s.util_pct for s in window) / len(window) if window else None
    found: list[tuple[datetime, str]] = []
    low = mean is not None and mean < policy.gpu_util_below_pct and job.start <= start
    if low and covered([s.at for s in window], start, now, policy.sample_gap_s):
        since = min(previous.get(job.id, start), start)
        found.append((since, f"GPUs averaged {mean:.0f}% for {span(policy.window_s)} "
                             f"(< {policy.gpu_util_below_pct:g}%)"))  # fmt: skip
    if policy.replica_no_requests_s is not None and job.id in activity:
        quiet_from = max(activity[job.id] or job.start, job.start)
        quiet_s = (now - quiet_from).total_seconds()
        if quiet_s >= policy.replica_no_requests_s:
            what = "since it started" if activity[job.id] is None else "since its last one"
            found.append((quiet_from, f"served no request for {span(quiet_s)} ({what})"))
    if not found:
        return None
    since = min(at for at, _ in found)
    gpus = max(job.gpus, len({s.gpu_index for s in samples}))
    wasted = gpus * max((now - since).total_seconds(), 0.0) / 3600
    reason = "; ".join(text for _, text in found)
    return IdleFlag(job.id, job.user, job_kind(job), reason, since, gpus, round(wasted, 4), mean)


def asleep_by_design(running_jobs: Iterable[Job], tiers: Mapping[str, str | None]) -> dict[str, str]:
    """The replica jobs whose engines sleep by design, by job id, with their deployment: those of a
    deployment (or pool) in the warm tier (``tiers``: each deployment's stored tier). Their GPUs are held
    on purpose, for a wake in seconds: a chosen trade-off, never flagged idle nor scaled down."""
    found = {}
    for job in running_jobs:
        tag = parse_replica_tag(job.tag)
        if tag is not None and tiers.get(tag[0]) == WARM_TIER:
            found[job.id] = tag[0]
    return found


@dataclass(frozen=True, slots=True)
class PoolFacts:
    """What the idle decision and action need of a model pool (its replicas serve several members)."""

    last_request: datetime | None  # the newest request seen for any member (the awake floor's record)
    floor: int  # the awake floor now: jobs the pool keeps for the members in use
    min_replicas: int  # the pool's bounds (the most its members ask for)
    max_replicas: int
    members: tuple[str, ...] = ()


def pool_replicas_in_use(
    running_jobs: Iterable[Job], activity: Mapping[str, datetime | None], pools: Mapping[str, PoolFacts],
    policy: IdleRules, now: datetime,
) -> dict[str, str]:  # fmt: skip
    """The replica jobs of pools that are not idle, by job id, with why. A pool with a member requested
    within the longer of the policy's spans (``window_s``, ``replica_no_requests_s``): each of its
    replicas (its engines wake and sleep by the members' requests, so a low GPU reading is no proof).
    Else the ``floor`` replicas used most recently (``activity``: each replica's last request on its
    engines): they hold the pool's awake floor. The rest are judged as any replica."""
    recent_s = max(policy.window_s, policy.replica_no_requests_s or 0)
    by_pool: dict[str, list[tuple[int, Job]]] = {}
    for job in running_jobs:
        tag = parse_replica_tag(job.tag)
        if tag is not None and tag[0] in pools:
            by_pool.setdefault(tag[0], []).append((tag[1], job))
    kept: dict[str, str] = {}
    for name, jobs in by_pool.items():
        facts = pools[name]
        stamps = [facts.last_request, *(activity.get(j.id) for _, j in jobs)]
        newest = max((t for t in stamps if t is not None), default=None)
        if newest is not None and (now - newest).total_seconds() < recent_s:
            why = f"pool {name}: a member was requested {span((now - newest).total_seconds())} ago"
            kept |= {j.id: why for _, j in jobs}
            continue
        latest = sorted(jobs, key=lambda ij: (-_stamp(activity.get(ij[1].id)), ij[0]))
        kept |= {j.id: f"pool {name}: holds its awake floor {facts.floor}" for _, j in latest[: facts.floor]}
    return kept


def _stamp(at: datetime | None) -> float:
    return at.timestamp() if at is not None else float("-inf")


def pool_scale_target(facts: PoolFacts, active: int) -> tuple[int | None, str]:
    """One replica fewer for an idle pool running ``active`` replicas: the pool's new ``max_replicas``
    (None: it holds), and why, never below max(1, ``min_replicas``, the awake floor)."""
    wanted = min(active, facts.max_replicas) - 1
    lowest = max(1, facts.min_replicas, facts.floor)
    if wanted < lowest:
        return None, (f"max_replicas {facts.max_replicas}, min_replicas {facts.min_replicas}, awake floor "
                      f"{facts.floor}, {active} running")  # fmt: skip
    return wanted, f"max_replicas {facts.max_replicas} -> {wanted}"


def warm_to_json(job: Job, deployment: str) -> dict[str, Any]:
    """A warm replica job as the service stores and serves it beside the flags."""
    return {"job_id": job.id, "user": job.user, "deployment": deployment, "gpus": job.gpus}


def covered(times: Sequence[datetime], start: datetime, end: datetime, gap_s: float) -> bool:
    """Whether readings at ``times`` cover ``[start, end]`` with no hole longer than ``gap_s``."""
    if not times:
        return False
    ordered = sorted(set(times))
    edges = [start, *ordered, end]
    return all((b - a).total_seconds() <= gap_s for a, b in pairwise(edges))


def span(seconds: float) -> str:
    """A duration for a reason line: "45 s", "30 min", "2.5 h"."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def flag_to_json(flag: IdleFlag) -> dict[str, Any]:
    """A flag as the service stores and serves it (``since`` in ISO 8601)."""
    return {"job_id": flag.job_id, "user": flag.user, "kind": flag.kind, "reason": flag.reason,
            "since": flag.since.isoformat(), "gpus": flag.gpus, "gpu_hours_wasted": flag.gpu_hours_wasted,
            "mean_util_pct": flag.mean_util_pct}  # fmt: skip


def flag_from_json(data: Mapping[str, Any]) -> IdleFlag:
    mean = data.get("mean_util_pct")
    return IdleFlag(str(data["job_id"]), str(data["user"]), str(data["kind"]), str(data["reason"]),
                    datetime.fromisoformat(str(data["since"])), int(data["gpus"]),
                    float(data["gpu_hours_wasted"]), None if mean is None else float(mean))  # fmt: skip
