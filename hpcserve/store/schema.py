"""The database schema as SQLAlchemy 2 declarative models. Only the store uses these classes; callers get the
frozen records of ``hpcserve.store.records``.

Every timestamp column is ``UtcDateTime``: aware UTC datetimes in and out, on SQLite (which has no time zone)
as on PostgreSQL. Specs and plan moves are JSON, never pickles. A migration in ``migrations/versions`` must
match these models: ``tests/test_store.py`` compares them on both backends.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Dialect,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so later migrations (batch mode on SQLite) can refer to them.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
# Sample tables grow fastest: 64-bit ids on PostgreSQL, the rowid alias (INTEGER PRIMARY KEY) on SQLite.
SampleId = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that is aware UTC in Python; naive datetimes are refused rather than guessed at."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()}: pass an aware (UTC) datetime")
        value = value.astimezone(UTC)
        # SQLite compares the stored text: one zone-less format keeps that ordering right
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class QueueSampleRow(Base):
    """One partition's queue at one instant (the sampler's batched Slurm read)."""

    __tablename__ = "queue_samples"
    __table_args__ = (Index(None, "partition", "at"), Index(None, "at"))

    id: Mapped[int] = mapped_column(SampleId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    partition: Mapped[str] = mapped_column(String(128))
    pending_jobs: Mapped[int] = mapped_column(Integer)
    pending_gpus: Mapped[int] = mapped_column(Integer)
    running_gpus: Mapped[int] = mapped_column(Integer)
    idle_gpus: Mapped[int] = mapped_column(Integer)
    total_gpus: Mapped[int] = mapped_column(Integer)


class EngineSampleRow(Base):
    """One replica's engine metrics, or (``replica`` NULL) the gateway's buffer for a deployment."""

    __tablename__ = "engine_samples"
    __table_args__ = (Index(None, "deployment", "at"), Index(None, "at"))

    id: Mapped[int] = mapped_column(SampleId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    deployment: Mapped[str] = mapped_column(String(128))
    replica: Mapped[int | None] = mapped_column(Integer)
    waiting: Mapped[int | None] = mapped_column(Integer)
    running: Mapped[int | None] = mapped_column(Integer)
    kv_usage: Mapped[float | None] = mapped_column(Double)
    ttft_p50: Mapped[float | None] = mapped_column(Double)
    ttft_p95: Mapped[float | None] = mapped_column(Double)
    tokens_per_s: Mapped[float | None] = mapped_column(Double)
    gateway_waiting: Mapped[int | None] = mapped_column(Integer)
    source: Mapped[str | None] = mapped_column(String(128))  # the gateway of a replica=None sample


class LostWorkRow(Base):
    """A training job hpcserve evicted for a replica, and the GPU-seconds of work it lost."""

    __tablename__ = "lost_work"
    __table_args__ = (Index(None, "at"), Index(None, "job_id"))

    id: Mapped[int] = mapped_column(SampleId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    job_id: Mapped[str] = mapped_column(String(64))
    user: Mapped[str] = mapped_column(String(64))
    node: Mapped[str] = mapped_column(String(128))
    gpus: Mapped[int] = mapped_column(Integer)
    lost_gpu_s: Mapped[float] = mapped_column(Double)
    deployment: Mapped[str] = mapped_column(String(128))
    replica_job_id: Mapped[str] = mapped_column(String(64))


class GpuSampleRow(Base):
    """One reading of one GPU of a job: from the in-job NVML sampler (``source`` "nvml") or sacct's
    ``gres/gpuutil`` (``source`` "sacct")."""

    __tablename__ = "gpu_samples"
    __table_args__ = (Index(None, "job_id", "at"), Index(None, "at"))

    id: Mapped[int] = mapped_column(SampleId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64))
    user: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # training | inference
    deployment: Mapped[str | None] = mapped_column(String(128))  # a replica's deployment
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    gpu_uuid: Mapped[str] = mapped_column(String(96))
    gpu_index: Mapped[int] = mapped_column(Integer)
    util_pct: Mapped[float] = mapped_column(Double)
    mem_used_bytes: Mapped[int] = mapped_column(BigInteger)
    mem_total_bytes: Mapped[int] = mapped_column(BigInteger)
    power_w: Mapped[float | None] = mapped_column(Double)
    sm_clock_mhz: Mapped[int | None] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(8))  # nvml | sacct


class QueueRollupRow(Base):
    """Raw queue samples of one partition and bucket, downsampled: the mean and maximum of each field."""

    __tablename__ = "queue_rollups"

    partition: Mapped[str] = mapped_column(String(128), primary_key=True)
    bucket_start: Mapped[datetime] = mapped_column(UtcDateTime(), primary_key=True)
    bucket_s: Mapped[int] = mapped_column(Integer, primary_key=True)
    samples: Mapped[int] = mapped_column(Integer)
    avg_pending_jobs: Mapped[float | None] = mapped_column(Double)
    max_pending_jobs: Mapped[float | None] = mapped_column(Double)
    avg_pending_gpus: Mapped[float | None] = mapped_column(Double)
    max_pending_gpus: Mapped[float | None] = mapped_column(Double)
    avg_running_gpus: Mapped[float | None] = mapped_column(Double)
    max_running_gpus: Mapped[float | None] = mapped_column(Double)
    avg_idle_gpus: Mapped[float | None] = mapped_column(Double)
    max_idle_gpus: Mapped[float | None] = mapped_column(Double)
    avg_total_gpus: Mapped[float | None] = mapped_column(Double)
    max_total_gpus: Mapped[float | None] = mapped_column(Double)


class EngineRollupRow(Base):
    """Raw engine samples of one deployment (all replicas and the gateway) and bucket, downsampled."""

    __tablename__ = "engine_rollups"

    deployment: Mapped[str] = mapped_column(String(128), primary_key=True)
    bucket_start: Mapped[datetime] = mapped_column(UtcDateTime(), primary_key=True)
    bucket_s: Mapped[int] = mapped_column(Integer, primary_key=True)
    samples: Mapped[int] = mapped_column(Integer)
    avg_waiting: Mapped[float | None] = mapped_column(Double)
    max_waiting: Mapped[float | None] = mapped_column(Double)
    avg_running: Mapped[float | None] = mapped_column(Double)
    max_running: Mapped[float | None] = mapped_column(Double)
    avg_kv_usage: Mapped[float | None] = mapped_column(Double)
    max_kv_usage: Mapped[float | None] = mapped_column(Double)
    avg_ttft_p50: Mapped[float | None] = mapped_column(Double)
    max_ttft_p50: Mapped[float | None] = mapped_column(Double)
    avg_ttft_p95: Mapped[float | None] = mapped_column(Double)
    max_ttft_p95: Mapped[float | None] = mapped_column(Double)
    avg_tokens_per_s: Mapped[float | None] = mapped_column(Double)
    max_tokens_per_s: Mapped[float | None] = mapped_column(Double)
    avg_gateway_waiting: Mapped[float | None] = mapped_column(Double)
    max_gateway_waiting: Mapped[float | None] = mapped_column(Double)


class DeploymentRow(Base):
    """A served model's desired state. ``deleted_at`` is set while its replicas are still stopping."""

    __tablename__ = "deployments"
    __table_args__ = (Index(None, "served_model_name", unique=True),)

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    generation: Mapped[int] = mapped_column(Integer)
    desired_replicas: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # the name clients ask the gateway for: one deployment each, across all owners
    served_model_name: Mapped[str | None] = mapped_column(String(128))
    account: Mapped[str | None] = mapped_column(String(64))  # the Slurm account its replicas are charged to
    shares: Mapped[list[str] | None] = mapped_column(JSON)  # users, "@group" or "all" whose keys reach it
    # the residency tier the service chose (hot, warm, cold, off; NULL: hot, never moved) and since when
    tier: Mapped[str | None] = mapped_column(String(8))
    tier_since: Mapped[datetime | None] = mapped_column(UtcDateTime())


class ReplicaRow(Base):
    """One replica job of a deployment and where it serves."""

    __tablename__ = "replicas"

    deployment: Mapped[str] = mapped_column(
        String(128), ForeignKey("deployments.name", ondelete="CASCADE"), primary_key=True
    )
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    generation: Mapped[int | None] = mapped_column(Integer)
    job_id: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    url: Mapped[str | None] = mapped_column(String(512))
    host: Mapped[str | None] = mapped_column(String(255))
    port: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    ready_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # sha256 of the secret the service issued at submit; the replica proves itself with it when it announces
    secret_hash: Mapped[str | None] = mapped_column(String(64))
    # the key the replica's engine requires on /v1 (VLLM_API_KEY): the gateway sends it upstream
    engine_key: Mapped[str | None] = mapped_column(String(64))
    # a pool replica's engines: {served model name: port} on ``host`` (NULL: one engine, at ``port``)
    models: Mapped[dict[str, int] | None] = mapped_column(JSON)
    # how its start went: the phases it recorded (hpcserve.serving.phases.StartPhases.as_json)
    phases: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class RebalancePlanRow(Base):
    """A rebalancing plan: the node moves it makes and where it stands."""

    __tablename__ = "rebalance_plans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    moves: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())  # set on reaching a final state
    holder: Mapped[str | None] = mapped_column(String(255))  # "host:pid" of the process that last ran it


class RebalanceStepRow(Base):
    """One step of a plan, persisted as it runs so an executor can resume after a crash."""

    __tablename__ = "rebalance_steps"

    plan_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("rebalance_plans.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    node: Mapped[str] = mapped_column(String(128))
    src: Mapped[str] = mapped_column(String(128))
    dst: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    detail: Mapped[str] = mapped_column(Text)


class UsageRow(Base):
    """Gateway usage counters of one API key, model and UTC day."""

    __tablename__ = "usage"

    key_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)


class LockRow(Base):
    """A named lease (the service's leader lock): held by ``holder`` until ``expires_at``."""

    __tablename__ = "locks"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())


class ApiKeyRow(Base):
    """A gateway API key a user made through the service. Only a salted HMAC of the secret is kept: the key
    is ``hpk_<id>_<secret>``, shown once."""

    __tablename__ = "api_keys"
    __table_args__ = (Index(None, "owner"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(128))
    salt: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64))  # hex HMAC-SHA256(salt, secret)
    models: Mapped[list[str] | None] = mapped_column(JSON)  # None: every model the owner may reach
    rate: Mapped[float | None] = mapped_column(Double)  # tokens/s
    burst: Mapped[float | None] = mapped_column(Double)
    max_tokens: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    priority: Mapped[str] = mapped_column(String(16), server_default="interactive")  # or batch
    allow_fallback: Mapped[bool] = mapped_column(Boolean, server_default=false())


class ServiceStateRow(Base):
    """Typed decision state the service carries between ticks (the planner's, each autoscaler's), kept in
    the database so a restarted or standby service starts with it. ``data`` is the state's JSON encoding."""

    __tablename__ = "service_state"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
