"""The service's idle tick: load -> decide (``hpcserve.telemetry.idle``) -> record -> act.

Each tick reads the running jobs from the shared Slurm view (the controller's read, no extra RPC), the GPU
readings of the last window and the replicas' last requests from the store, decides the flags, and keeps
them in the service state ``telemetry:idle`` (the API's ``hpcserve idle`` and ``ps``, and /metrics, read
them there). A job newly flagged is one log line; with ``idle.action.inference: scale_down`` its
deployment also gets one replica fewer (one more log line), never below ``min_replicas``.

A replica job of a deployment in the warm tier (its engines asleep by design, the job kept for a wake in
seconds) is never judged: it is kept apart as "warm" in the same state (``hpcserve idle`` lists it so). A
pool's replica job is judged like any replica (the controller samples its engines under the pool's name),
but never scaled down by the idle action: it serves several models, and the pool scales on their summed
load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from hpcserve.api.telemetry import FLAGS_STATE, current_flags
from hpcserve.model.cluster import Job, JobState
from hpcserve.model.telemetry import GpuSample, IdleFlag
from hpcserve.serving.tags import parse_replica_tag
from hpcserve.telemetry.idle import asleep_by_design, flag_to_json, idle_flags, warm_to_json

if TYPE_CHECKING:
    from hpcserve.config.policy import IdleRules
    from hpcserve.store import HistoryStore

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
        warm = self._warm(running)
        judged = [j for j in running if j.id not in warm]  # asleep by design: not idle
        samples, activity = self._samples(now, judged), self._activity(judged, now)
        flags = idle_flags(samples, judged, activity, self.rules, now,
                           previous={k: f.since for k, f in previous.items()})  # fmt: skip
        self.store.put_state(FLAGS_STATE, {"evaluated_at": now.isoformat(),
                                           "flags": [flag_to_json(f) for f in flags],
                                           "warm": [warm_to_json(j, warm[j.id]) for j in running
                                                    if j.id in warm]})  # fmt: skip
        for flag in (f for f in flags if f.job_id not in previous):
            self._newly_flagged(flag, running)
        return flags

    def _warm(self, running: Sequence[Job]) -> dict[str, str]:
        """The running replica jobs of deployments in the warm tier (one read of the deployments, only
        when a replica runs)."""
        if not any(parse_replica_tag(j.tag) for j in running):
            return {}
        return asleep_by_design(running, {d.name: d.tier for d in self.store.list_deployments()})

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

    def _newly_flagged(self, flag: IdleFlag, running: Sequence[Job]) -> None:
        log.info("idle: job %s of %s (%s, %d GPUs): %s; %.2f GPU-hours wasted so far", flag.job_id,
                 flag.user, flag.kind, flag.gpus, flag.reason, flag.gpu_hours_wasted)  # fmt: skip
        if flag.kind == "inference" and self.rules.action.inference == "scale_down":
            job = next((j for j in running if j.id == flag.job_id), None)
            tag = parse_replica_tag(job.tag) if job is not None else None
            if tag is not None:
                try:
                    scale_down(self.store, tag[0], flag)
                except Exception:  # one deployment's failure must not keep the other flags' lines
                    log.exception("idle: could not scale down deployment %s", tag[0])


def scale_down(store: HistoryStore, name: str, flag: IdleFlag) -> int | None:
    """One replica fewer for ``name`` (the flagged replica's deployment): its ``max_replicas`` lowered to
    one below the replicas it runs, as ``hpcserve scale NAME --max N`` does (a lower desired count alone
    would be undone by the autoscaler at its next tick), never below max(1, ``min_replicas``). The owner
    raises it again with ``hpcserve scale``. A pool (its replicas serve several models) and a deployment
    in the warm tier (asleep by design) are left as they are. The new maximum, or None when nothing
    changed."""
    from hpcserve.serving.pools import is_pool
    from hpcserve.serving.spec import DeploymentSpec, build_deployment
    from hpcserve.telemetry.idle import WARM_TIER

    deployment = store.get_deployment(name)
    if deployment is None or deployment.deleted:
        return None
    pool = is_pool(deployment.spec)
    if pool or deployment.tier == WARM_TIER:
        why = "a pool scales on its members' summed load" if pool else "warm: asleep by design"
        log.info("idle: deployment %s not scaled down: %s (job %s)", name, why, flag.job_id)
        return None
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
