"""GPU-hours, cost and tokens per user, account, deployment, key or partition: pure (no clock, no I/O).

How each figure is made (the API's ``notes`` repeat this for readers of the report):
- GPU-seconds of a run: its allocated GPUs (``gres/gpu=N`` of AllocTRES) x its seconds inside the window.
  A run wholly inside the window counts all of Slurm's ElapsedRaw; one that overlaps an edge counts only the
  part inside (from max(start, since) to min(start + ElapsedRaw, until)). Each run of a requeued job counts.
- Price: per GPU type, from the typed ``gres/gpu:TYPE=N`` entries where slurmdbd records them, otherwise the
  type of the run's nodes in the site config when they all have one, otherwise the ``default`` price.
- Kind: a run is inference when it is a replica (the service's replica records, the replica tag in its
  comment, or the replica job name ``<deployment>-r<n>`` on a deployment its user owns); training otherwise.
- Busy/idle: a job's mean GPU utilisation (telemetry) x its GPU-seconds is busy, the rest idle; a job with
  no telemetry is "unknown", never guessed.
- Served nothing: a replica's GPU-seconds covered by engine samples (each covers until the next one, at
  most ``cover_s``) that showed no request running or waiting. Time no sample covers (loading weights,
  before ready, a gap in sampling) is "unobserved", not counted as either.
- Tokens: the gateway's counters per key, deployment and UTC day, so the window's first day counts whole.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Literal

from hpcserve.model.cluster import TAG_PREFIX, tag_of
from hpcserve.model.usage import GpuAllocation

GroupBy = Literal["user", "account", "deployment", "key", "partition"]
GROUP_BY: tuple[GroupBy, ...] = ("user", "account", "deployment", "key", "partition")
REPLICA_TAG = f"{TAG_PREFIX}replica:"
_REPLICA_NAME = re.compile(r"^(?P<deployment>.+)-r(?P<index>\d+)$")  # the launcher's job name


@dataclass(frozen=True, slots=True)
class DeploymentInfo:
    owner: str
    account: str | None = None


@dataclass(frozen=True, slots=True)
class TokenRow:
    """The gateway's counters for one key on one deployment on one UTC day."""

    key_id: str
    owner: str  # the key's owner ("" for a key the store does not know)
    deployment: str
    day: date
    requests: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class EngineMark:
    """One engine sample of a replica: whether it had a request running or waiting."""

    at: datetime
    busy: bool


@dataclass(frozen=True, slots=True)
class UsageInputs:
    since: datetime
    until: datetime
    allocations: Sequence[GpuAllocation]
    price: Callable[[str | None], float]
    replica_jobs: Mapping[str, tuple[str, int]] = field(default_factory=dict)  # job id -> (deployment, n)
    deployments: Mapping[str, DeploymentInfo] = field(default_factory=dict)
    tokens: Sequence[TokenRow] = ()
    utilisation: Mapping[str, float] = field(default_factory=dict)  # job id -> mean util %
    engine: Mapping[tuple[str, int], Sequence[EngineMark]] = field(default_factory=dict)  # oldest first
    node_types: Mapping[str, str | None] = field(default_factory=dict)
    cover_s: float = 10.0
    hpcserve_only: bool = False


@dataclass(frozen=True, slots=True)
class JobUsage:
    """One run's share of the window."""

    job_id: str
    user: str
    account: str
    partition: str
    kind: Literal["training", "inference"]
    deployment: str | None
    hpcserve: bool
    gpus: int
    gpu_seconds: int
    cost: float
    busy_gpu_seconds: float | None  # None: no telemetry for this job
    served_gpu_seconds: float = 0.0  # replicas: covered by samples with a request running or waiting
    served_nothing_gpu_seconds: float = 0.0  # replicas: covered by samples with none


@dataclass
class UsageGroup:
    """Sums for one group (and, with the group "", for everything visible)."""

    group: str
    jobs: int = 0
    gpu_seconds: int = 0
    training_gpu_seconds: int = 0
    inference_gpu_seconds: int = 0
    busy_gpu_seconds: float = 0.0
    idle_gpu_seconds: float = 0.0
    unknown_util_gpu_seconds: int = 0
    cost: float = 0.0
    served_nothing_gpu_seconds: float = 0.0
    unobserved_replica_gpu_seconds: float = 0.0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add_job(self, job: JobUsage) -> None:
        self.jobs += 1
        self.gpu_seconds += job.gpu_seconds
        self.cost += job.cost
        if job.kind == "inference":
            self.inference_gpu_seconds += job.gpu_seconds
            self.served_nothing_gpu_seconds += job.served_nothing_gpu_seconds
            unobserved = job.gpu_seconds - job.served_gpu_seconds - job.served_nothing_gpu_seconds
            self.unobserved_replica_gpu_seconds += max(0.0, unobserved)
        else:
            self.training_gpu_seconds += job.gpu_seconds
        if job.busy_gpu_seconds is None:
            self.unknown_util_gpu_seconds += job.gpu_seconds
        else:
            self.busy_gpu_seconds += job.busy_gpu_seconds
            self.idle_gpu_seconds += job.gpu_seconds - job.busy_gpu_seconds

    def add_tokens(self, row: TokenRow) -> None:
        self.requests += row.requests
        self.prompt_tokens += row.prompt_tokens
        self.completion_tokens += row.completion_tokens

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def cost_per_million_tokens(self) -> float | None:
        """GPU cost over tokens served, where the group has both (a deployment's replicas and its traffic)."""
        if not self.tokens or not self.gpu_seconds:
            return None
        return self.cost / self.tokens * 1_000_000


@dataclass(frozen=True, slots=True)
class UsageReport:
    by: GroupBy
    groups: tuple[UsageGroup, ...]
    total: UsageGroup
    jobs: tuple[JobUsage, ...]


def classify(
    run: GpuAllocation,
    replica_jobs: Mapping[str, tuple[str, int]],
    deployments: Mapping[str, DeploymentInfo],
) -> tuple[str, int] | None:
    """(deployment, replica index) when ``run`` is a replica, else None. A replica tag or name counts only
    for a deployment its user owns (or one the store no longer knows): anyone may write a tag."""
    known = replica_jobs.get(run.job_id)
    if known is not None:
        return known
    tag = tag_of(run.comment) or ""
    if tag.startswith(REPLICA_TAG):
        deployment, _, index = tag.removeprefix(REPLICA_TAG).rpartition(":")
        if deployment and index.isdigit() and _owned(deployment, run.user, deployments, unknown_ok=True):
            return deployment, int(index)
    match = _REPLICA_NAME.match(run.name)
    if match and _owned(match["deployment"], run.user, deployments, unknown_ok=False):
        return match["deployment"], int(match["index"])
    return None


def _owned(name: str, user: str, deployments: Mapping[str, DeploymentInfo], *, unknown_ok: bool) -> bool:
    info = deployments.get(name)
    return unknown_ok if info is None else info.owner == user


def gpu_split(run: GpuAllocation, node_types: Mapping[str, str | None]) -> list[tuple[str | None, int]]:
    """The run's GPUs by type: the typed TRES entries, the rest by its nodes' one type (else None)."""
    typed: list[tuple[str | None, int]] = [(name, count) for name, count in run.gpu_types if count > 0]
    rest = run.gpus - sum(count for _, count in typed)
    if rest > 0:
        types = {node_types.get(node) for node in run.nodes}
        typed.append((types.pop() if len(types) == 1 else None, rest))
    return typed


def served_seconds(
    marks: Sequence[EngineMark], start: datetime, end: datetime, cover_s: float
) -> tuple[float, float]:
    """(seconds with a request, seconds with none) of ``[start, end)`` that the samples cover: each sample
    covers until the next one, at most ``cover_s``."""
    busy = idle = 0.0
    reach = timedelta(seconds=cover_s)
    for i, mark in enumerate(marks):
        stop = mark.at + reach
        if i + 1 < len(marks):
            stop = min(stop, marks[i + 1].at)
        covered = (min(stop, end) - max(mark.at, start)).total_seconds()
        if covered > 0:
            busy, idle = (busy + covered, idle) if mark.busy else (busy, idle + covered)
    return busy, idle


def job_usage(run: GpuAllocation, inputs: UsageInputs) -> JobUsage | None:
    """The run's share of the window (None for a run with no GPU-seconds in it)."""
    seconds = run.seconds_within(inputs.since, inputs.until)
    if seconds <= 0 or run.gpus <= 0:
        return None
    replica = classify(run, inputs.replica_jobs, inputs.deployments)
    cost = sum(
        count * seconds / 3600 * inputs.price(kind) for kind, count in gpu_split(run, inputs.node_types)
    )
    util = inputs.utilisation.get(run.job_id)
    gpu_seconds = run.gpus * seconds
    busy = None if util is None else gpu_seconds * min(max(util, 0.0), 100.0) / 100
    served = nothing = 0.0
    if replica is not None and run.start is not None:
        low = max(run.start, inputs.since)
        high = low + timedelta(seconds=seconds)
        served, nothing = served_seconds(inputs.engine.get(replica, ()), low, high, inputs.cover_s)
    return JobUsage(
        run.job_id, run.user, run.account, run.partition, "inference" if replica else "training",
        replica[0] if replica else None, replica is not None or tag_of(run.comment) is not None, run.gpus,
        gpu_seconds, cost, busy, served * run.gpus, nothing * run.gpus,
    )  # fmt: skip


def job_key(job: JobUsage, by: GroupBy) -> str | None:
    """The group a run belongs to (None: runs are not grouped this way, as by key)."""
    keys = {"user": job.user, "account": job.account, "deployment": job.deployment or "",
            "partition": job.partition, "key": None}  # fmt: skip
    return keys[by]


def token_key(row: TokenRow, by: GroupBy, accounts: Mapping[str, str]) -> str | None:
    """The group a token row belongs to (None: tokens are not grouped this way, as by partition)."""
    keys = {"user": row.owner, "account": accounts.get(row.deployment, ""), "deployment": row.deployment,
            "key": row.key_id, "partition": None}  # fmt: skip
    return keys[by]


def deployment_accounts(
    jobs: Iterable[JobUsage], deployments: Mapping[str, DeploymentInfo]
) -> dict[str, str]:
    """Each deployment's Slurm account: as the store has it, else the one its replica runs were charged."""
    seen: dict[str, Counter[str]] = {}
    for job in jobs:
        if job.deployment is not None:
            seen.setdefault(job.deployment, Counter())[job.account] += job.gpu_seconds
    found = {name: counts.most_common(1)[0][0] for name, counts in seen.items()}
    return found | {name: info.account for name, info in deployments.items() if info.account}


def usage_report(inputs: UsageInputs, by: GroupBy) -> UsageReport:
    """Every visible run and token row, summed per group of ``by`` and in total."""
    jobs = [job for run in inputs.allocations if (job := job_usage(run, inputs)) is not None]
    if inputs.hpcserve_only:
        jobs = [job for job in jobs if job.hpcserve]
    groups: dict[str, UsageGroup] = {}
    total = UsageGroup("")
    for job in jobs:
        total.add_job(job)
        key = job_key(job, by)
        if key is not None:
            groups.setdefault(key, UsageGroup(key)).add_job(job)
    accounts = deployment_accounts(jobs, inputs.deployments)
    for row in inputs.tokens:
        total.add_tokens(row)
        key = token_key(row, by, accounts)
        if key is not None:
            groups.setdefault(key, UsageGroup(key)).add_tokens(row)
    ordered = sorted(groups.values(), key=lambda g: (-g.cost, -g.gpu_seconds, -g.tokens, g.group))
    return UsageReport(by, tuple(ordered), total, tuple(jobs))


def visible_tokens(
    rows: Iterable[TokenRow], user: str | None, owned_deployments: Iterable[str], by: GroupBy
) -> list[TokenRow]:
    """The token rows a caller may see: every row for an admin (``user`` None); otherwise their own keys'
    rows, plus, summed per deployment or account, what others' keys used on deployments they own (never
    under another user's name or key)."""
    if user is None:
        return list(rows)
    mine = frozenset(owned_deployments)
    wide = by in ("deployment", "account")
    return [row for row in rows if row.owner == user or (wide and row.deployment in mine)]
