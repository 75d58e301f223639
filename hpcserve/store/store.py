"""``HistoryStore``: hpcserve's database behind one object that owns its engine.

The constructor does no I/O: the engine (and, for SQLite, the database's folder) is made on first use.
Every method is one transaction, committed before it returns; writes on SQLite take the write lock up front
(see ``engine.py``). Timestamps are aware UTC datetimes both ways. Rows come back as the frozen records of
``hpcserve.store.records``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from types import TracebackType
from typing import Any, Unpack

from sqlalchemy import Connection, Engine

from hpcserve.model.telemetry import GpuSample
from hpcserve.store import counters, deployments, migrate, plans, retention, samples, state, telemetry
from hpcserve.store import keys as api_keys
from hpcserve.store.engine import make_engine, parse_url, writer
from hpcserve.store.errors import reported
from hpcserve.store.records import (
    ApiKeyRecord,
    Deployment,
    DeploymentExtra,
    EngineSample,
    GpuSampleRecord,
    LostWork,
    NewStep,
    Plan,
    QueueSample,
    Replica,
    ReplicaFields,
    RetentionResult,
    Rollup,
    SchemaStatus,
    Step,
    Usage,
)
from hpcserve.store.schema import EngineSampleRow, LostWorkRow, QueueSampleRow

PENDING = "pending"


def utc_now() -> datetime:
    return datetime.now(UTC)


class HistoryStore:
    """Samples and rollups, deployments and replicas, rebalance plans, usage counters, leases and the
    service's named decision state.

    ``admins`` may change any deployment; everyone else only their own. ``clock`` stamps created/updated
    times (tests pass a fixed one).
    """

    def __init__(
        self, url: str, *, admins: Iterable[str] = (), clock: Callable[[], datetime] = utc_now
    ) -> None:
        self.url = parse_url(url)
        self.admins = frozenset(admins)
        self._clock = clock
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.url)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with writer(self.engine).begin() as conn:
            yield conn

    # schema

    def upgrade(self, target: str = "head") -> str | None:
        """Run the migrations up to ``target``; the revision the database is at afterwards."""
        with reported(self.url.render_as_string(hide_password=False)):
            return migrate.upgrade(self.engine, target)

    def schema_status(self) -> SchemaStatus:
        with reported(self.url.render_as_string(hide_password=False)):
            return migrate.schema_status(self.engine)

    # samples

    def add_queue_samples(self, rows: Iterable[QueueSample]) -> int:
        with self._write() as conn:
            return samples.add_samples(conn, QueueSampleRow, rows)

    def queue_samples(
        self, partition: str | None = None, since: datetime | None = None, until: datetime | None = None
    ) -> list[QueueSample]:
        """Raw samples in ``[since, until)``, oldest first."""
        with self._read() as conn:
            return samples.queue_samples(conn, partition, since, until)

    def add_engine_samples(self, rows: Iterable[EngineSample]) -> int:
        with self._write() as conn:
            return samples.add_samples(conn, EngineSampleRow, rows)

    def gateway_sources(self, since: datetime) -> list[str]:
        """The gateways (``source``) that wrote a sample since ``since``: the live ones."""
        with self._read() as conn:
            return samples.gateway_sources(conn, since)

    def add_lost_work(self, rows: Iterable[LostWork]) -> int:
        """Record evicted jobs and the work each lost (``lending: overlap``)."""
        with self._write() as conn:
            return samples.add_samples(conn, LostWorkRow, rows)

    def lost_work(self, since: datetime | None = None) -> list[LostWork]:
        """Evictions since ``since`` (all of them: None), oldest first."""
        with self._read() as conn:
            return samples.lost_work(conn, since)

    def engine_samples(
        self, deployment: str, since: datetime | None = None, until: datetime | None = None
    ) -> list[EngineSample]:
        """Raw samples in ``[since, until)``, oldest first; at one instant the gateway's (replica None)
        comes first."""
        with self._read() as conn:
            return samples.engine_samples(conn, deployment, since, until)

    def queue_rollups(self, partition: str | None = None, since: datetime | None = None) -> list[Rollup]:
        with self._read() as conn:
            return samples.queue_rollups(conn, partition, since)

    def engine_rollups(self, deployment: str | None = None, since: datetime | None = None) -> list[Rollup]:
        with self._read() as conn:
            return samples.engine_rollups(conn, deployment, since)

    def apply_retention(
        self, now: datetime, raw_days: float = 7, rollup_days: float = 180, bucket_s: int = 3600,
        gpu_days: float = retention.GPU_DAYS,
    ) -> RetentionResult:  # fmt: skip
        """Fold raw samples older than ``raw_days`` (whole buckets) into rollups and delete them; delete
        rollups older than ``rollup_days``, and GPU telemetry older than ``gpu_days`` (kept raw: usage
        reports split a month's GPU-hours into busy and idle). Safe to repeat: nothing is counted twice."""
        return retention.apply_retention(self.engine, now, raw_days, rollup_days, bucket_s, gpu_days)

    # GPU telemetry (``hpcserve.store.telemetry``)

    def add_gpu_samples(
        self, samples: Iterable[GpuSample], *, user: str, kind: str, deployment: str | None = None,
        source: str = "nvml",
    ) -> int:  # fmt: skip
        """Store readings of ``user``'s job (kind "training" or "inference"); how many."""
        with self._write() as conn:
            return telemetry.add_gpu_samples(conn, samples, user, kind, deployment, source)

    def gpu_samples(
        self, since: datetime | None, until: datetime | None = None, *,
        job_ids: Collection[str] | None = None, user: str | None = None,
    ) -> list[GpuSampleRecord]:  # fmt: skip
        """Readings in ``[since, until)``, of ``job_ids`` and/or ``user`` when given, oldest first."""
        with self._read() as conn:
            return telemetry.gpu_samples(conn, since, until, job_ids, user)

    def latest_gpu_samples(
        self, since: datetime, *, job_ids: Collection[str] | None = None, user: str | None = None
    ) -> list[GpuSampleRecord]:
        """The newest reading of each GPU of each job, no older than ``since``."""
        with self._read() as conn:
            return telemetry.latest_gpu_samples(conn, since, job_ids, user)

    def job_utilisation(self, since: datetime, until: datetime | None = None) -> dict[str, float]:
        """Mean GPU utilisation (0..100) of each job with readings in ``[since, until)``, by job id."""
        with self._read() as conn:
            return telemetry.job_utilisation(conn, since, until)

    def last_requests(self, deployments: Collection[str], since: datetime) -> dict[tuple[str, int], datetime]:
        """When each replica of ``deployments`` last had a request on its engine (its engine samples since
        ``since``), by (deployment, index); replicas seen serving nothing are left out."""
        with self._read() as conn:
            return telemetry.last_requests(conn, deployments, since)

    # deployments and replicas

    def create_deployment(
        self, name: str, owner: str, spec: Mapping[str, Any], desired: int, **extra: Unpack[DeploymentExtra]
    ) -> Deployment:
        """Store a new deployment; ``DeploymentExists`` if the name is taken, ``ServedNameTaken`` if its
        served model name is."""
        with self._write() as conn:
            return deployments.create(conn, name, owner, spec, desired, self._clock(), extra)

    def set_shares(self, name: str, shares: list[str], *, user: str) -> Deployment:
        """Who else may reach the deployment through their API keys; the same ownership rule as scaling."""
        return self._change(deployments.set_shares, name, shares, user)

    def get_deployment(self, name: str) -> Deployment | None:
        with self._read() as conn:
            return deployments.get(conn, name)

    def list_deployments(self) -> list[Deployment]:
        """All deployments by name, those being deleted included (``Deployment.deleted``)."""
        with self._read() as conn:
            return deployments.list_all(conn)

    def set_desired(self, name: str, replicas: int, *, user: str) -> Deployment:
        """Set the replica count; ``NotOwner`` unless ``user`` owns the deployment or is an admin."""
        return self._change(deployments.set_desired, name, replicas, user)

    def update_spec(self, name: str, spec: Mapping[str, Any], *, user: str) -> Deployment:
        """Replace the spec and bump ``generation``; the same ownership rule as ``set_desired``."""
        return self._change(deployments.update_spec, name, spec, user)

    def _change(self, change: Callable[..., None], name: str, value: Any, user: str) -> Deployment:
        with self._write() as conn:
            change(conn, name, value, user, user in self.admins, self._clock())
            found = deployments.get(conn, name)
        assert found is not None
        return found

    def delete_deployment(self, name: str, *, user: str) -> bool:
        """Delete (desired 0); the row stays, marked, until its last replica is removed. True when the row
        is already gone (it had no replicas)."""
        with self._write() as conn:
            return deployments.delete_deployment(conn, name, user, user in self.admins, self._clock())

    def set_tier(self, name: str, tier: str, now: datetime) -> None:
        """The deployment's residency tier (hot, warm, cold or off) since ``now`` (the controller's)."""
        with self._write() as conn:
            deployments.set_tier(conn, name, tier, now)

    def join_pool(
        self, name: str, owner: str, spec: Mapping[str, Any], pool: str, pool_spec: deployments.PoolSpecOf,
        **extra: Unpack[DeploymentExtra],
    ) -> Deployment:  # fmt: skip
        """Store member ``name`` and create or update the row of its pool ``pool`` (spec from
        ``pool_spec(pool, members' specs)``) in one transaction; ``NotOwner`` for another user's pool."""
        with self._write() as conn:
            return deployments.join_pool(conn, name, owner, spec, pool, pool_spec, self._clock(), extra)

    def refresh_pool(self, pool: str, pool_spec: deployments.PoolSpecOf) -> None:
        """The pool's spec again from its members' (after a member's spec changed)."""
        with self._write() as conn:
            deployments.leave_pool(conn, pool, pool_spec, self._clock())

    def leave_pool(self, name: str, pool: str, pool_spec: deployments.PoolSpecOf, *, user: str) -> bool:
        """Delete member ``name`` and, in the same transaction, update its pool's spec from the members left
        or delete the pool with its last member. True when the member's row is gone."""
        with self._write() as conn:
            gone = deployments.delete_deployment(conn, name, user, user in self.admins, self._clock())
            deployments.leave_pool(conn, pool, pool_spec, self._clock())
            return gone

    def upsert_replica(self, deployment: str, index: int, **fields: Unpack[ReplicaFields]) -> Replica:
        """Create replica ``index`` (state "pending" unless given) or update the fields given."""
        with self._write() as conn:
            return deployments.upsert_replica(conn, deployment, index, fields, self._clock())

    def replicas(self, deployment: str | None = None) -> list[Replica]:
        """The deployment's replicas by index (all deployments' when None)."""
        with self._read() as conn:
            return deployments.replicas(conn, deployment)

    def remove_replica(self, deployment: str, index: int) -> bool:
        with self._write() as conn:
            return deployments.remove_replica(conn, deployment, index)

    # rebalance plans

    def create_plan(
        self, reason: str, moves: Sequence[Mapping[str, Any]], steps: Sequence[NewStep], state: str = PENDING,
        *, holder: str | None = None,
    ) -> int:  # fmt: skip
        """Store a plan and its steps (numbered 0, 1, ... in order, all "todo"); the plan's id. ``holder``:
        the process that made it ("host:pid")."""
        with self._write() as conn:
            return plans.create_plan(conn, reason, moves, steps, state, self._clock(), holder)

    def plans(self, state: str | None = None, *, last: int | None = None) -> list[Plan]:
        """Plans oldest first (in ``state`` if given); ``last``: only the newest that many."""
        with self._read() as conn:
            return plans.plans(conn, state, last=last)

    def plan(self, plan_id: int) -> Plan | None:
        with self._read() as conn:
            found = plans.plans(conn, None, plan_id)
        return found[0] if found else None

    def steps(self, plan_id: int) -> list[Step]:
        with self._read() as conn:
            return plans.steps(conn, plan_id)

    def done_moves(self) -> list[Step]:
        """The move steps carried out, of every plan (whatever became of the plan), oldest first."""
        with self._read() as conn:
            return plans.done_moves(conn)

    def start_step(self, plan_id: int, seq: int) -> Step:
        """Record that a step began (``started_at``); committed before the step acts."""
        with self._write() as conn:
            return plans.start_step(conn, plan_id, seq, self._clock())

    def mark_step(self, plan_id: int, seq: int, state: str, detail: str = "") -> Step:
        """Set a step's state ("done"/"failed" also set ``finished_at``); committed at once."""
        with self._write() as conn:
            return plans.mark_step(conn, plan_id, seq, state, detail, self._clock())

    def set_plan_state(self, plan_id: int, state: str, *, holder: str | None = None) -> None:
        """Set a plan's state; a final one (done, failed, aborted) also sets ``finished_at``. ``holder``, when
        given, records the process now running the plan (None keeps the one recorded)."""
        with self._write() as conn:
            plans.set_plan_state(conn, plan_id, state, self._clock(), holder)

    # usage and leases

    def add_usage(
        self, key_id: str, model: str, day: date, requests: int, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """Add to the day's counters of ``key_id`` and ``model`` (an atomic upsert)."""
        row = Usage(key_id, model, day, requests, prompt_tokens, completion_tokens)
        with self._write() as conn:
            counters.add_usage(conn, row)

    def usage(self, key_id: str | None = None, since: date | None = None) -> list[Usage]:
        with self._read() as conn:
            return counters.usage(conn, key_id, since)

    def try_lock(
        self, name: str, holder: str, ttl_s: float, now: datetime, *, stale: str | None = None
    ) -> bool:
        """Take the lease ``name`` until ``now + ttl_s`` if it is free, expired, already ``holder``'s (then
        it is renewed) or still ``stale``'s (a holder the caller knows is dead); whether ``holder`` has it."""
        with self._write() as conn:
            return counters.try_lock(conn, name, holder, ttl_s, now, stale)

    def lock_holder(self, name: str) -> str | None:
        """Who holds (or last held, if it expired) the lease ``name``; None if nobody took it."""
        with self._read() as conn:
            return counters.lock_holder(conn, name)

    def release_lock(self, name: str, holder: str) -> bool:
        with self._write() as conn:
            return counters.release_lock(conn, name, holder)

    # named decision state (``hpcserve.store.state``): "rebalance:planner", "scaler:<deployment>", ...

    def get_state(self, name: str) -> dict[str, Any] | None:
        """The JSON object stored under ``name``; None if there is none."""
        with self._read() as conn:
            return state.get_state(conn, name)

    def states(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Every state whose name starts with ``prefix`` (e.g. "scaler:"), by name: one query."""
        with self._read() as conn:
            return state.states(conn, prefix)

    def put_state(self, name: str, data: Mapping[str, Any]) -> None:
        """Store ``data`` (a JSON object) under ``name``, replacing what was there; committed at once."""
        with self._write() as conn:
            state.put_state(conn, name, data, self._clock())

    def delete_state(self, name: str) -> bool:
        """Forget the state ``name``; whether there was one."""
        with self._write() as conn:
            return state.delete_state(conn, name)

    # gateway API keys (``hpcserve.store.keys``): made and revoked through the service, read by the gateway

    def add_api_key(self, key: ApiKeyRecord) -> ApiKeyRecord:
        with self._write() as conn:
            return api_keys.add_key(conn, key)

    def api_keys(self, owner: str | None = None, *, live_only: bool = False) -> list[ApiKeyRecord]:
        """Keys (``owner``'s when given; not revoked ones with ``live_only``), oldest first."""
        with self._read() as conn:
            return api_keys.keys(conn, owner, live_only=live_only)

    def api_key(self, key_id: str) -> ApiKeyRecord | None:
        with self._read() as conn:
            return api_keys.get_key(conn, key_id)

    def revoke_api_key(self, key_id: str, *, user: str, admin: bool = False) -> ApiKeyRecord:
        """Revoke ``user``'s key (any key for an admin); ``NotFound`` otherwise."""
        with self._write() as conn:
            return api_keys.revoke_key(conn, key_id, user, admin or user in self.admins, self._clock())

    def usage_of(self, key_ids: Collection[str] | None, since: date | None = None) -> list[Usage]:
        """Usage rows of ``key_ids`` (all when None) from ``since`` on."""
        with self._read() as conn:
            return api_keys.usage_of(conn, key_ids, since)
