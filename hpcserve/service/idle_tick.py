"""The service's idle tick: load -> decide (``hpcserve.telemetry.idle``) -> record -> act.

Each tick reads the running jobs from the shared Slurm view (the controller's read, no extra RPC), the GPU
readings of the last window and the replicas' last requests from the store, decides the flags, and keeps
them in the service state ``telemetry:idle`` (the API's ``hpcserve idle`` and ``ps``, and /metrics, read
them there). A job newly flagged is one log line; with ``idle.action.inference: scale_down`` its
deployment also gets one replica fewer (one more log line), never below ``min_replicas``.

A replica job of a deployment in the warm tier (its engines asleep by design, the job kept for a wake in
seconds) is never judged: it is kept apart as "warm" in the same state (``hpcserve idle`` lists it so).

A model pool's replica job serves several members (the controller samples its engines under the pool's
name). It is not judged while a member was requested within the policy's window (the awake floor's record
of each member's newest request, and the pool's engine samples), nor while it is one of the replicas that
hold the pool's awake floor (``telemetry.idle.pool_replicas_in_use``). An idle one is scaled down the way a
pool's scaling is changed (``hpcserve scale MEMBER --max N``): each member's ``max_replicas`` is lowered,
and the pool's spec derived from its members again, so a member that leaves does not undo it; never below
max(1, the members' ``min_replicas``, the awake floor).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from hpcserve.api.telemetry import FLAGS_STATE, current_flags
from hpcserve.model.cluster import Job, JobState
from hpcserve.model.telemetry import GpuSample, IdleFlag
from hpcserve.serving.tags import parse_replica_tag
from hpcserve.telemetry.idle import (
    PoolFacts,
    asleep_by_design,
    flag_to_json,
    idle_flags,
    pool_replicas_in_use,
    pool_scale_target,
    warm_to_json,
)

if TYPE_CHECKING:
    from hpcserve.config.policy import IdleRules
    from hpcserve.serving.pools import AwakeState
    from hpcserve.store import Deployment, HistoryStore

log = logging.getLogger("hpcserve.idle")
MAX_LOOKBACK = timedelta(days=7)  # a replica's last request is looked for this far back at most
MAX_IDS = 2000  # more running jobs than this: the window's readings are read without a job filter


def tick_interval_s(rules: IdleRules) -> float:
    """How often the tick runs: a sixth of the shortest idle span, between 2 s and a minute."""
    spans = [rules.window_s, *([rules.replica_no_requests_s] if rules.replica_no_requests_s else [])]
    return min(max(min(spans) / 6, 2.0), 60.0)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class IdleTick:
    """One tick per call (``tick()``); ``running`` keeps the last tick's running job ids for /metrics."""

    def __init__(self, jobs: Callable[[], Sequence[Job]], store: HistoryStore, rules: IdleRules,
                 clock: Callable[[], datetime] = _utc_now) -> None:  # fmt: skip
        self.jobs, self.store, self.rules, self.clock = jobs, store, rules, clock
        self.running: frozenset[str] | None = None

    def tick(self) -> list[IdleFlag]:
        now = self.clock()
        running = [j for j in self.jobs() if j.state == JobState.RUNNING]
        self.running = frozenset(j.id for j in running)
        previous = {f.job_id: f for f in current_flags(self.store.get_state(FLAGS_STATE), now)}
        warm, judged, activity = self._judged(running, now)
        flags = idle_flags(self._samples(now, judged), judged, activity, self.rules, now,
                           previous={k: f.since for k, f in previous.items()})  # fmt: skip
        self.store.put_state(FLAGS_STATE, {"evaluated_at": now.isoformat(),
                                           "flags": [flag_to_json(f) for f in flags],
                                           "warm": [warm_to_json(j, warm[j.id]) for j in running
                                                    if j.id in warm]})  # fmt: skip
        for flag in (f for f in flags if f.job_id not in previous):
            self._newly_flagged(flag, running, now)
        return flags

    def _judged(
        self, running: Sequence[Job], now: datetime
    ) -> tuple[dict[str, str], list[Job], dict[str, datetime | None]]:
        """The warm replica jobs (asleep by design), the jobs to judge (neither warm nor a pool's replica
        in use), and each replica's last request. The deployments are read once, only when a replica
        runs."""
        listed = self.store.list_deployments() if any(parse_replica_tag(j.tag) for j in running) else []
        warm = asleep_by_design(running, {d.name: d.tier for d in listed})
        judged = [j for j in running if j.id not in warm]
        activity = self._activity(judged, now)
        in_use = pool_replicas_in_use(judged, activity, pool_facts(self.store, listed, now), self.rules, now)
        return warm, [j for j in judged if j.id not in in_use], activity

    def _samples(self, now: datetime, running: Sequence[Job]) -> dict[str, list[GpuSample]]:
        """The window's readings of the running jobs (of every job when there are very many)."""
        since = now - timedelta(seconds=self.rules.window_s)
        ids = [j.id for j in running] if len(running) <= MAX_IDS else None
        by_job: dict[str, list[GpuSample]] = {}
        for record in self.store.gpu_samples(since, job_ids=ids):
            by_job.setdefault(record.job_id, []).append(record.sample())
        return by_job

    def _activity(self, running: Sequence[Job], now: datetime) -> dict[str, datetime | None]:
        """For each running replica job: when its engine last had a request (None: never seen)."""
        replicas = {j.id: (tag, j) for j in running if (tag := parse_replica_tag(j.tag)) is not None}
        if not replicas or self.rules.replica_no_requests_s is None:
            return {}
        known = {(r.deployment, r.index): r.job_id for r in self.store.replicas() if r.job_id in replicas}
        starts = [j.start for _, j in replicas.values() if j.start is not None]
        since = max(min(starts, default=now), now - MAX_LOOKBACK)
        last = self.store.last_requests({d for d, _ in known}, since)
        return {job_id: last.get(key) for key, job_id in known.items() if job_id is not None}

    def _newly_flagged(self, flag: IdleFlag, running: Sequence[Job], now: datetime) -> None:
        log.info("idle: job %s of %s (%s, %d GPUs): %s; %.2f GPU-hours wasted so far", flag.job_id,
                 flag.user, flag.kind, flag.gpus, flag.reason, flag.gpu_hours_wasted)  # fmt: skip
        if flag.kind == "inference" and self.rules.action.inference == "scale_down":
            job = next((j for j in running if j.id == flag.job_id), None)
            tag = parse_replica_tag(job.tag) if job is not None else None
            if tag is not None:
                try:
                    scale_down(self.store, tag[0], flag, now)
                except Exception:  # one deployment's failure must not keep the other flags' lines
                    log.exception("idle: could not scale down deployment %s", tag[0])


def scale_down(store: HistoryStore, name: str, flag: IdleFlag, now: datetime | None = None) -> int | None:
    """One replica fewer for ``name`` (the flagged replica's deployment): its ``max_replicas`` lowered to
    one below the replicas it runs, as ``hpcserve scale NAME --max N`` does (a lower desired count alone
    would be undone by the autoscaler at its next tick), never below max(1, ``min_replicas``). The owner
    raises it again with ``hpcserve scale``. A pool: ``scale_down_pool``. A deployment in the warm tier
    (asleep by design) is left as it is. The new maximum, or None when nothing changed."""
    from hpcserve.serving.pools import is_pool
    from hpcserve.serving.spec import DeploymentSpec, build_deployment
    from hpcserve.telemetry.idle import WARM_TIER

    deployment = store.get_deployment(name)
    if deployment is None or deployment.deleted:
        return None
    if deployment.tier == WARM_TIER:
        log.info("idle: deployment %s not scaled down: warm: asleep by design (job %s)", name, flag.job_id)
        return None
    if is_pool(deployment.spec):
        return scale_down_pool(store, deployment, flag, now or _utc_now())
    spec = DeploymentSpec.model_validate(deployment.spec)
    active = sum(r.state in ("starting", "ready") for r in store.replicas(name))
    wanted = min(active, spec.max_replicas) - 1
    if wanted < max(1, spec.min_replicas):
        log.info("idle: deployment %s not scaled down: max_replicas %d, min_replicas %d (job %s)", name,
                 spec.max_replicas, spec.min_replicas, flag.job_id)  # fmt: skip
        return None
    lowered = build_deployment({"max_replicas": wanted}, spec)
    store.update_spec(name, lowered.model_dump(mode="json"), user=deployment.owner)
    log.info("idle: deployment %s scaled down: max_replicas %d -> %d (job %s: %s)", name, spec.max_replicas,
             wanted, flag.job_id, flag.reason)  # fmt: skip
    return wanted


def scale_down_pool(store: HistoryStore, pool: Deployment, flag: IdleFlag, now: datetime) -> int | None:
    """One replica fewer for an idle pool, the way ``hpcserve scale MEMBER --max N`` changes a pool's
    bounds: each member's ``max_replicas`` lowered to one below the replicas the pool runs, then the pool's
    spec derived from its members again (``store.refresh_pool``), so that neither the autoscaler nor a
    member leaving undoes it. Never below max(1, the members' ``min_replicas``, the awake floor). The new
    maximum, or None when nothing changed."""
    from hpcserve.serving.pools import members_of, pool_spec
    from hpcserve.serving.spec import DeploymentSpec, build_deployment

    listed = store.list_deployments()
    facts = pool_facts(store, listed, now).get(pool.name)
    if facts is None:
        return None
    active = sum(r.state in ("starting", "ready") for r in store.replicas(pool.name))
    wanted, why = pool_scale_target(facts, active)
    if wanted is None:
        log.info("idle: pool %s not scaled down: %s (job %s)", pool.name, why, flag.job_id)
        return None
    members = members_of(listed).get(pool.name, [])
    for member in members:
        spec = DeploymentSpec.model_validate(member.spec)
        if spec.max_replicas > wanted:
            lowered = build_deployment({"max_replicas": wanted}, spec)
            store.update_spec(member.name, lowered.model_dump(mode="json"), user=member.owner)
    store.refresh_pool(pool.name, pool_spec)
    log.info("idle: pool %s scaled down: %s on its members %s (job %s: %s)", pool.name, why,
             ", ".join(m.name for m in members), flag.job_id, flag.reason)  # fmt: skip
    return wanted


def pool_facts(store: HistoryStore, listed: Sequence[Deployment], now: datetime) -> dict[str, PoolFacts]:
    """Each live pool's facts for the idle decision (``listed``: the deployments): its members' newest
    request and its awake floor now, from the floor's state the controller keeps (one read, only when
    there are pools), and its bounds."""
    from hpcserve.serving.pools import is_pool, members_of
    from hpcserve.serving.residency import AwakeFloors

    pools = [d for d in listed if is_pool(d.spec) and not d.deleted]
    if not pools:
        return {}
    members, states = members_of(listed), AwakeFloors.load(store).states
    return {p.name: _facts(p.spec, [m.name for m in members.get(p.name, [])], states.get(p.name), now)
            for p in pools}  # fmt: skip


def _facts(spec: Mapping[str, Any], members: list[str], state: AwakeState | None, now: datetime) -> PoolFacts:
    """One pool's facts; its floor as the controller's next tick would find it with no new request."""
    from hpcserve.serving.pools import AwakeRule, AwakeState, as_replica_spec, awake_floor
    from hpcserve.serving.spec import DeploymentSpec

    replica = DeploymentSpec.model_validate(as_replica_spec(spec))
    state = state or AwakeState()
    floor, _ = awake_floor(AwakeRule.of(replica), dict.fromkeys(members), state, now)
    last = max(state.last_request.values(), default=None)
    return PoolFacts(last, floor, replica.min_replicas, replica.max_replicas, tuple(members))
