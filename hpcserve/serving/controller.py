"""The serving controller: one tick loads, decides and applies, for every deployment.

load:   the deployments and replicas (database), hpcserve's replica jobs (one squeue for all), the
        replicas' announcements (shared folder), their engines' /metrics, the gateway's buffered requests;
decide: the autoscaler (pure) sets the desired count, the reconciler (pure) turns it into actions;
apply:  sbatch / scancel / database writes; engine samples are recorded for history.

A failure in one deployment is logged and the others go on; the next tick repairs what a crash left.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcserve.serving.launcher import launch_replica
from hpcserve.serving.reconciler import (
    Action,
    Adopt,
    Cancel,
    Forget,
    Launch,
    Observed,
    ReplicaState,
    ReplicaView,
    SetState,
    reconcile,
)
from hpcserve.serving.replica import announcement_path, read_announcement
from hpcserve.serving.tags import parse_replica_tag

if TYPE_CHECKING:
    from hpcserve.jobs.submit import Submitter
    from hpcserve.serving.engine_stats import EngineStats
    from hpcserve.slurm.models import Job
    from hpcserve.slurm.protocol import SlurmClient
    from hpcserve.store import Deployment, HistoryStore, Replica

log = logging.getLogger("hpcserve.serving")
GATEWAY_SAMPLE_AGE_S = 10.0
SCRAPE_WORKERS = 16  # engines scraped at once (each scrape waits at most its own timeout)
Scrape = Callable[[str], "EngineStats | None"]  # replica URL -> its engine's stats, None if unreachable


@dataclass
class ServingController:
    store: HistoryStore
    client: SlurmClient
    submitter: Callable[[], Submitter]  # a fresh view of the cluster per tick
    replica_dir: Path
    ready_timeout_s: float
    scrape: Scrape
    service_user: str
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    scaler_states: dict[str, Any] = field(default_factory=dict)
    autoscaler: Callable[..., tuple[int, Any]] | None = None  # default: hpcserve.serving.scaling.autoscale

    def tick(self) -> None:
        now = self.clock()
        jobs = _replica_jobs(self.client.jobs())
        submitter = self.submitter()
        for deployment in self.store.list_deployments():
            try:
                self._tick_one(deployment, jobs.get(deployment.name, {}), submitter, now)
            except Exception:  # one bad deployment must not stop the others, nor the scheduler
                log.exception("serving tick failed for deployment %s", deployment.name)

    def _tick_one(
        self, deployment: Deployment, jobs: Mapping[int, Job], submitter: Submitter, now: datetime
    ) -> None:
        replicas, dead = self._drop_dead(deployment.name, self.store.replicas(deployment.name), jobs)
        jobs = {i: job for i, job in jobs.items() if i not in dead}  # cancelled: not to be adopted again
        stats = self._scrape(deployment.name, replicas, now)
        desired = self._autoscale(deployment, replicas, stats, now)
        notes = self._announcements(deployment.name, replicas, jobs)
        seen = Observed(jobs, notes, _inflight(stats), frozenset(dead))
        views = [_view(r) for r in replicas if r.state in {s.value for s in ReplicaState}]
        actions = reconcile(desired, views, seen, now, self.ready_timeout_s)
        for action in actions:
            self._apply(deployment, action, submitter, now)

    def _drop_dead(
        self, name: str, replicas: list[Replica], jobs: Mapping[int, Job]
    ) -> tuple[list[Replica], set[int]]:
        """Replicas cancelled earlier: forgotten once their job has left the queue, ignored until then."""
        dead = {r.index for r in replicas if r.state == "dead"}
        for index in dead - set(jobs):
            self.store.remove_replica(name, index)
        return [r for r in replicas if r.state != "dead"], dead

    def _autoscale(self, deployment: Deployment, replicas: list[Replica], stats: Mapping[int, EngineStats],
                   now: datetime) -> int:  # fmt: skip
        """The desired count after the autoscaler; a deleted deployment wants none."""
        if deployment.deleted:
            return 0
        from hpcserve.serving.scaling import autoscale

        desired, state = (self.autoscaler or autoscale)(
            deployment, replicas, stats, self._gateway_waiting(deployment.name, now),
            self.scaler_states.get(deployment.name), now,
        )  # fmt: skip
        self.scaler_states[deployment.name] = state
        if desired != deployment.desired_replicas:
            self.store.set_desired(deployment.name, desired, user=self.service_user)
        return desired

    def _gateway_waiting(self, name: str, now: datetime) -> int:
        since = now - timedelta(seconds=GATEWAY_SAMPLE_AGE_S)
        rows = [s for s in self.store.engine_samples(name, since=since) if s.replica is None]
        return rows[-1].gateway_waiting or 0 if rows else 0

    def _scrape(self, name: str, replicas: list[Replica], now: datetime) -> dict[int, EngineStats]:
        from hpcserve.store import EngineSample

        targets = {r.index: r.url for r in replicas if r.url and r.state in ("ready", "draining")}
        stats = {i: s for i, s in zip(targets, self._scrape_all(list(targets.values())), strict=True)
                 if s is not None}  # fmt: skip
        self.store.add_engine_samples([
            EngineSample(now, name, index, s.waiting, s.running, s.kv_usage, s.ttft_p50, s.ttft_p95)
            for index, s in stats.items()
        ])  # fmt: skip
        return stats

    def _scrape_all(self, urls: list[str]) -> list[EngineStats | None]:
        """Every URL's stats, scraped at once: a tick waits for the slowest engine, not for their sum."""
        if len(urls) <= 1:
            return [self.scrape(url) for url in urls]
        with ThreadPoolExecutor(max_workers=min(len(urls), SCRAPE_WORKERS)) as pool:
            return list(pool.map(self.scrape, urls))

    def _announcements(self, name: str, replicas: list[Replica], jobs: Mapping[int, Job]) -> dict[int, Any]:
        indices = {r.index for r in replicas} | set(jobs)
        found = {i: read_announcement(announcement_path(self.replica_dir, name, i)) for i in indices}
        return {i: note for i, note in found.items() if note is not None}

    def _apply(self, deployment: Deployment, action: Action, submitter: Submitter, now: datetime) -> None:
        name = deployment.name
        log.info("deployment %s: %s", name, action)
        match action:
            case Launch(index):
                spec = _spec(deployment)
                job_id = launch_replica(submitter, spec, index, self.replica_dir, self.ready_timeout_s)
                self.store.upsert_replica(name, index, job_id=job_id, state="starting", started_at=now)
            case Adopt(index, job_id):
                self.store.upsert_replica(name, index, job_id=job_id, state="starting", started_at=now)
            case SetState(index, state, url):
                fields: dict[str, Any] = {"state": state.value}
                if url is not None:
                    fields |= {"url": url, "ready_at": now}
                self.store.upsert_replica(name, index, **fields)
            case Cancel(index, job_id, _):
                self.client.cancel([job_id])
                self.store.upsert_replica(name, index, state="dead")
            case Forget(index, _):
                self.store.remove_replica(name, index)
                announcement_path(self.replica_dir, name, index).unlink(missing_ok=True)


def _spec(deployment: Deployment) -> Any:
    from hpcserve.serving.spec import DeploymentSpec

    return DeploymentSpec.model_validate(deployment.spec)


def _replica_jobs(jobs: list[Job]) -> dict[str, dict[int, Job]]:
    """hpcserve's live replica jobs by deployment and index (from their ``--comment`` tag)."""
    found: dict[str, dict[int, Job]] = defaultdict(dict)
    for job in jobs:
        parsed = parse_replica_tag(job.tag)
        if parsed is not None and not job.state.is_terminal:
            found[parsed[0]][parsed[1]] = job
    return found


def _inflight(stats: Mapping[int, EngineStats]) -> dict[int, int]:
    return {index: (s.waiting or 0) + (s.running or 0) for index, s in stats.items()}


def _view(replica: Replica) -> ReplicaView:
    return ReplicaView(replica.index, replica.job_id or "0", ReplicaState(replica.state),
                       replica.started_at or replica.updated_at, replica.url)  # fmt: skip
