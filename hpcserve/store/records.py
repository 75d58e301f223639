"""What the store takes and returns: plain frozen records, never ORM objects.

States are plain strings checked against the tuples below, so a caller's ``StrEnum`` (``serving`` and
``rebalance`` keep their own, with their groupings) passes straight through without this layer knowing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, TypedDict

from hpcserve.errors import ValidationError
from hpcserve.model.gateway import Priority
from hpcserve.model.telemetry import GpuSample

REPLICA_STATES = ("pending", "starting", "ready", "draining", "dead")
STEP_KINDS = ("drain", "signal", "wait", "move", "resume")
STEP_STATES = ("todo", "done", "failed")
PLAN_STATES = ("pending", "running", "done", "failed", "aborted")
FINAL_PLAN_STATES = ("done", "failed", "aborted")  # a plan in one of these never runs again

QUEUE_FIELDS = ("pending_jobs", "pending_gpus", "running_gpus", "idle_gpus", "total_gpus")
ENGINE_FIELDS = ("waiting", "running", "kv_usage", "ttft_p50", "ttft_p95", "tokens_per_s", "gateway_waiting")


def check_state(what: str, value: str, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``; a ValidationError that lists them otherwise."""
    if value not in allowed:
        raise ValidationError(f"unknown {what} {value!r}: use one of {', '.join(allowed)}")
    return str(value)


@dataclass(frozen=True, slots=True)
class QueueSample:
    at: datetime
    partition: str
    pending_jobs: int
    pending_gpus: int
    running_gpus: int
    idle_gpus: int
    total_gpus: int


@dataclass(frozen=True, slots=True)
class EngineSample:
    """A replica's engine metrics; with ``replica=None``, the gateway's buffer for the deployment."""

    at: datetime
    deployment: str
    replica: int | None
    waiting: int | None = None
    running: int | None = None
    kv_usage: float | None = None
    ttft_p50: float | None = None
    ttft_p95: float | None = None
    tokens_per_s: float | None = None
    gateway_waiting: int | None = None
    source: str | None = None  # which gateway wrote a replica=None sample ("host:port"); None: a replica


@dataclass(frozen=True, slots=True)
class LostWork:
    """One training job evicted for a replica (``lending: overlap``): the work it loses, in GPU-seconds since
    its last checkpoint (or its start, without a marker), when hpcserve signalled it."""

    at: datetime
    job_id: str
    user: str
    node: str
    gpus: int
    lost_gpu_s: float
    deployment: str
    replica_job_id: str

    @property
    def lost_gpu_h(self) -> float:
        return self.lost_gpu_s / 3600


@dataclass(frozen=True, slots=True)
class Rollup:
    """Samples of one key (partition or deployment) in ``[bucket_start, bucket_start + bucket_s)``.

    ``avg`` and ``max`` map each field to its mean and maximum over the samples that had a value (None when
    none had). After late samples are merged into a bucket, means are weighted by ``samples``.
    """

    key: str
    bucket_start: datetime
    bucket_s: int
    samples: int
    avg: dict[str, float | None]
    max: dict[str, float | None]


@dataclass(frozen=True, slots=True)
class Deployment:
    name: str
    owner: str
    spec: dict[str, Any]
    generation: int  # bumped by every spec change
    desired_replicas: int
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None  # set while the replicas of a deleted deployment stop
    served_model_name: str | None = None  # unique across deployments; None only for pre-0003 clashes
    account: str | None = None  # the Slurm account its replicas are charged to (None: the owner's default)
    shares: list[str] | None = None  # users, "@group" or "all" whose keys may reach it
    tier: str | None = None  # hot, warm, cold or off (None: hot, never moved); see hpcserve.serving.tiers
    tier_since: datetime | None = None

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None


class DeploymentExtra(TypedDict, total=False):
    """Columns beside the spec that ``create_deployment`` may set."""

    served_model_name: str
    account: str | None
    shares: list[str] | None


class ReplicaFields(TypedDict, total=False):
    """The replica columns ``upsert_replica`` may set; those left out keep their value."""

    generation: int | None
    job_id: str | None
    state: str
    url: str | None
    host: str | None
    port: int | None
    started_at: datetime | None
    ready_at: datetime | None
    secret_hash: str | None
    engine_key: str | None
    models: dict[str, int] | None
    phases: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Replica:
    deployment: str
    index: int
    generation: int | None
    job_id: str | None
    state: str
    url: str | None
    host: str | None
    port: int | None
    started_at: datetime | None
    ready_at: datetime | None
    updated_at: datetime
    secret_hash: str | None = None  # sha256 of the replica's secret (issued at submit)
    engine_key: str | None = field(default=None, repr=False)  # its engine's /v1 key (the gateway's only)
    models: dict[str, int] | None = None  # a pool replica's engines: {served model name: port} on ``host``
    phases: dict[str, Any] | None = None  # its start's phases (hpcserve.serving.phases.StartPhases)


@dataclass(frozen=True, slots=True)
class NewStep:
    """A step as the planner writes it; the store numbers steps 0, 1, ... in the order given."""

    node: str
    src: str
    dst: str
    kind: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Step:
    plan_id: int
    seq: int
    node: str
    src: str
    dst: str
    kind: str
    state: str
    started_at: datetime | None  # set by start_step; with state "todo", the step may be half done
    finished_at: datetime | None
    detail: str


@dataclass(frozen=True, slots=True)
class Plan:
    id: int
    created_at: datetime
    updated_at: datetime
    state: str
    reason: str
    moves: list[dict[str, Any]]
    finished_at: datetime | None  # when it reached a final state (done, failed, aborted)
    holder: str | None  # "host:pid" of the process that last ran it (None: not recorded)


@dataclass(frozen=True, slots=True)
class Usage:
    key_id: str
    model: str
    day: date
    requests: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    current: str | None  # None: no hpcserve tables yet
    head: str

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


@dataclass(frozen=True, slots=True)
class RetentionResult:
    queue_rolled: int  # raw rows folded into rollups and deleted
    engine_rolled: int
    queue_rollups_deleted: int
    engine_rollups_deleted: int
    gpu_samples_deleted: int = 0  # GPU telemetry past its own window (``gpu_days``)


@dataclass(frozen=True, slots=True)
class GpuSampleRecord:
    """A stored GPU reading (``gpu_samples``): the sample and whose job it is. ``source``: "nvml" (the
    in-job sampler) or "sacct" (slurmd's gres/gpuutil)."""

    at: datetime
    job_id: str
    user: str
    kind: str  # training | inference
    deployment: str | None
    gpu_uuid: str
    gpu_index: int
    util_pct: float
    mem_used_bytes: int
    mem_total_bytes: int
    power_w: float | None
    sm_clock_mhz: int | None
    source: str

    def sample(self) -> GpuSample:
        return GpuSample(
            self.at, self.job_id, self.gpu_uuid, self.gpu_index, self.util_pct, self.mem_used_bytes,
            self.mem_total_bytes, self.power_w, self.sm_clock_mhz,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """A gateway API key as stored: never the key, only its salt and ``digest`` = hex HMAC-SHA256(salt,
    secret) of the key ``hpk_<id>_<secret>``. ``models`` None: whatever the owner may reach."""

    id: str
    owner: str
    label: str
    salt: str
    digest: str
    models: list[str] | None
    rate: float | None
    burst: float | None
    max_tokens: int | None
    created_at: datetime
    revoked_at: datetime | None = None
    priority: Priority = "interactive"  # batch: waits behind interactive requests, shed first
    allow_fallback: bool = False  # an overloaded deployment may send its requests to its fallback

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None
