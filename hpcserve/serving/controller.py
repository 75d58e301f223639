"""The serving controller: one tick loads, decides and applies, for every deployment. Only the service runs
it (``hpcserve service``, under the leader lease): it submits replicas as their owners.

load:   the deployments and replicas (database: with the replicas' announcements), hpcserve's replica jobs
        (one squeue for all), their engines' /metrics, the gateway's buffered requests, the autoscalers'
        states (database, one query);
decide: the autoscaler (pure) sets the desired count, capped by the owner's GPU limits; the reconciler
        (pure) turns it into actions, over the replicas' own jobs only (``trusted_jobs``);
apply:  sbatch as the owner / scancel / database writes; engine samples are recorded for history.

A failure in one deployment is logged and the others go on; the next tick repairs what a crash left.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from hpcserve.serving.pools import is_pool, members_of, pool_of
from hpcserve.serving.reconciler import (
    Action,
    Announcement,
    Cancel,
    Forget,
    Launch,
    Observed,
    Recorded,
    ReplicaState,
    ReplicaView,
    SetState,
    reconcile,
    trusted_jobs,
)
from hpcserve.serving.residency import (
    AgentCall,
    AwakeFloors,
    Engines,
    PoolLoad,
    Residency,
    as_replica_deployment,
    call_agent,
    engine_urls,
    members_seen,
    merge_stats,
)
from hpcserve.serving.scaling import STATE_PREFIX, GpuLimit, ScalerRecord, cap_scale_up, state_name
from hpcserve.serving.tags import parse_replica_tag
from hpcserve.serving.tiers import Tier
from hpcserve.serving.unstage import Unstager
from hpcserve.slurm.shared_view import saw_change

if TYPE_CHECKING:
    from hpcserve.config import Policy
    from hpcserve.jobs.submit import Submitter
    from hpcserve.serving.engine_stats import EngineStats
    from hpcserve.serving.launcher import Launched, ReplicaLauncher
    from hpcserve.serving.spec import DeploymentSpec
    from hpcserve.slurm.models import Job
    from hpcserve.slurm.protocol import SlurmClient
    from hpcserve.store import Deployment, EngineSample, HistoryStore, Replica

log = logging.getLogger("hpcserve.serving")
GATEWAY_SAMPLE_AGE_S = 10.0
SCRAPE_WORKERS = 16  # engines scraped at once (each scrape waits at most its own timeout)
Scrape = Callable[[str], "EngineStats | None"]  # replica URL -> its engine's stats, None if unreachable
Autoscale = Callable[..., tuple[int, Any]]  # hpcserve.serving.scaling.autoscale
HELD = "JobHeldUser"  # the reason squeue shows for a replica submitted held (lending overlap)
EVICT_FOR = ("Resources", HELD)  # a replica waiting for GPUs, or submitted held
Prewarm = Callable[["Deployment", datetime], int]  # hpcserve.serving.overlap.PrewarmSource
Evict = Callable[["Job", "Sequence[Job]", datetime], Any]  # hpcserve.serving.overlap.GentleEvictor


@dataclass
class _Tick:
    """What one tick shares between deployments: the jobs, the scaler records, the GPUs submitted so far."""

    jobs: list[Job]
    records: dict[str, ScalerRecord]
    submitter: Submitter
    now: datetime
    draining: frozenset[str] = frozenset()  # nodes being drained (maintenance): replicas move off them
    launched_gpus: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    pools: PoolLoad = field(default_factory=PoolLoad)  # each pool's members
    floors: dict[str, int] = field(default_factory=dict)  # the forecast floor of each deployment this tick
    waiting: dict[str, int] = field(default_factory=dict)  # what the gateways buffer for each, this tick
    asked: dict[str, datetime] = field(default_factory=dict)  # newest gateway sample with requests waiting
    awake: AwakeFloors | None = None  # the pools' awake floors (loaded when there are pools)


@dataclass
class ServingController:
    store: HistoryStore
    client: SlurmClient
    submitter: Callable[[], Submitter]  # a fresh view of the cluster per tick
    launcher: ReplicaLauncher
    policy: Policy
    ready_timeout_s: float
    scrape: Scrape
    service_user: str
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    autoscaler: Autoscale | None = None  # default: hpcserve.serving.scaling.autoscale
    prewarm: Prewarm | None = None  # lending overlap: the forecast's replica floor (None: no floor)
    renew_before_s: float = 0.0  # hand a replica over this long before its time limit (0: never)
    stalls: StallWatch = field(default_factory=lambda: StallWatch(0.0))  # 0: stalls are not looked for
    evict: Evict | None = None  # lending overlap: signal gentle victims for a pending replica (None: Slurm's)
    ignored: set[str] = field(default_factory=set)  # foreign tagged jobs already logged
    calm: bool = False  # this tick, so far: every replica ready and answering, nothing done
    agent: AgentCall = call_agent  # a replica agent's HTTP (hpcserve.serving.residency)
    residency: Residency = field(init=False)
    unstage: Unstager = field(init=False)  # the warm copies of deployments gone off, removed as the owner

    def __post_init__(self) -> None:
        self.residency = Residency(self.store, self.agent)
        self.unstage = Unstager(self.store, self.launcher)

    def tick(self) -> None:
        all_jobs = [j for j in _read(self.client, "jobs") if not j.state.is_terminal]
        self.calm = True
        records = {name.removeprefix(STATE_PREFIX): ScalerRecord.from_json(data)
                   for name, data in self.store.states(STATE_PREFIX).items()}  # fmt: skip
        tagged = _replica_jobs(all_jobs)
        draining = _draining_nodes(self.client) if tagged else frozenset()
        tick = _Tick(all_jobs, records, self.submitter(), self.clock(), draining)
        self.ignored &= {job.id for jobs in tagged.values() for job in jobs}  # logged while they last
        listed = self.store.list_deployments()
        tick.pools = PoolLoad(members_of(listed))
        tick.awake = AwakeFloors.load(self.store) if tick.pools.members else None
        self.unstage.begin(listed)
        try:
            self.unstage.tidy_gone(tick.submitter)  # the warm copies of deployments removed (``rm``)
        except Exception:  # the record stays: the next tick tries again
            log.exception("serving tick: the warm cleanup of removed deployments failed")
        for deployment in listed:
            if pool_of(deployment.spec) is not None:
                continue  # a pool's member: no replicas of its own, the pool's row runs them
            try:
                self._tick_one(deployment, tagged.get(deployment.name, []), tick)
            except Exception:  # one bad deployment must not stop the others, nor the scheduler
                self.calm = False
                log.exception("serving tick failed for deployment %s", deployment.name)
        _settle(self.client, self.calm)

    def _tick_one(self, deployment: Deployment, tagged: list[Job], tick: _Tick) -> None:
        rows = self.store.replicas(deployment.name)
        jobs = self._trusted(deployment, rows, tagged)
        replicas, dead = self._drop_dead(deployment.name, rows, jobs)
        jobs = {i: job for i, job in jobs.items() if i not in dead}  # cancelled: left to finish
        stats = self._scrape(deployment.name, replicas, tick.now)
        engines = self.residency.engines(replicas) if not deployment.deleted else {}
        desired = self._autoscale(deployment, replicas, stats, engines, tick)
        tier = None if deployment.deleted else self._tier(deployment, replicas, stats, engines, tick)
        stalled = self.stalls.update(deployment.name, stats, tick.now)
        leaving = frozenset(i for i, job in jobs.items() if tick.draining.intersection(job.nodes))
        leaving |= tick.pools.stale(deployment, replicas)  # a pool's members changed: new replicas
        seen = Observed(jobs, _announcements(replicas), _inflight(stats), frozenset(dead), stalled, leaving)
        views = [_view(r) for r in replicas if r.state in {s.value for s in ReplicaState}]
        actions = reconcile(desired, views, seen, tick.now, self.ready_timeout_s, self.renew_before_s)
        if actions or dead or not _steady(replicas, stats):
            self.calm = False
            _settle(self.client, False)  # what is launched next is placed on a fresh view
        for action in actions:
            self._apply(deployment, action, tick)
        if self.evict is not None:
            for job in jobs.values():
                if job.state.is_pending and job.reason in EVICT_FOR:
                    self.evict(job, tick.jobs, tick.now)
        # off: nothing staged (hpcserve.serving.unstage); noted while deleted too: its removal cleans up
        self.unstage.note(deployment, replicas, jobs, tick.pools.specs(deployment))
        if tier is not None:
            self.unstage.tidy(deployment, tier, len(rows), tick.submitter)
        if tier not in (None, Tier.OFF) and tick.pools.settled(deployment, rows):
            self.unstage.tidy_left(deployment, tick.pools.specs(deployment) or [], tick.submitter)

    def _trusted(self, deployment: Deployment, rows: list[Replica], tagged: list[Job]) -> dict[int, Job]:
        """The replicas' own jobs by index; any other job tagged with the deployment is logged once."""
        recorded = [Recorded(r.index, r.job_id) for r in rows]
        trusted, ignored = trusted_jobs(deployment.owner, recorded, tagged)
        for job in ignored:
            if job.id not in self.ignored:
                self.ignored.add(job.id)
                log.warning("deployment %s: ignoring job %s of user %s tagged %s: not a replica the "
                            "service submitted as %s", deployment.name, job.id, job.user, job.tag,
                            deployment.owner)  # fmt: skip
        return trusted

    def _drop_dead(
        self, name: str, replicas: list[Replica], jobs: Mapping[int, Job]
    ) -> tuple[list[Replica], set[int]]:
        """Replicas cancelled earlier: forgotten once their job has left the queue, ignored until then."""
        dead = {r.index for r in replicas if r.state == "dead"}
        for index in dead - set(jobs):
            self.store.remove_replica(name, index)
        return [r for r in replicas if r.state != "dead"], dead

    def _autoscale(self, deployment: Deployment, replicas: list[Replica], stats: Mapping[int, EngineStats],
                   engines: Engines, tick: _Tick) -> int:  # fmt: skip
        """The desired count after the autoscaler and the owner's limits; a deleted deployment wants none.
        The floor: the forecast's (pre-warm), for a pool at least its awake floor."""
        if deployment.deleted:
            return 0
        from hpcserve.serving.scaling import autoscale

        record = tick.records.get(deployment.name, ScalerRecord())
        shaped = as_replica_deployment(deployment)  # a pool: its replicas' spec
        forecast = tick.floors[deployment.name] = self.prewarm(shaped, tick.now) if self.prewarm else 0
        waiting = tick.waiting[deployment.name] = self._waiting(deployment, tick)
        lowest = max(forecast, self._awake_floor(deployment, replicas, engines, tick))
        floor = {"floor": lowest} if self.prewarm or lowest else {}
        desired, state = (self.autoscaler or autoscale)(
            shaped, replicas, stats, waiting, record.state, tick.now, **floor
        )
        current = sum(r.state in ("starting", "ready") for r in replicas)
        desired, capped = cap_scale_up(
            desired, current, _gpus(_spec(deployment), self._shards_per_gpu), self._limit(deployment, tick)
        )
        if capped and capped != record.capped:
            log.warning("deployment %s: scale-up capped: %s", deployment.name, capped)
        updated = ScalerRecord(state, capped)
        tick.records[deployment.name] = updated
        if updated != record:
            self.store.put_state(state_name(deployment.name), updated.to_json())
        if desired != deployment.desired_replicas:
            self.store.set_desired(deployment.name, desired, user=self.service_user)
        return desired

    @property
    def _shards_per_gpu(self) -> int:
        """The site's ``serving.shards_per_gpu`` (the launcher's): what a GPU shard is a part of."""
        return int(getattr(self.launcher, "shards_per_gpu", 4))

    def _limit(self, deployment: Deployment, tick: _Tick) -> GpuLimit:
        from hpcserve.config.policy import JobClassName
        from hpcserve.jobs.policy import gpus_in_use

        rules = self.policy.classes[JobClassName.INFERENCE]
        used = (
            gpus_in_use(tick.jobs, deployment.owner, self._shards_per_gpu)
            + tick.launched_gpus[deployment.owner]
        )
        return GpuLimit(rules.max_gpus_per_user, rules.max_gpus_per_job, used, deployment.owner)

    def _tier(self, deployment: Deployment, replicas: list[Replica], stats: Mapping[int, EngineStats],
              engines: Engines, tick: _Tick) -> Tier:  # fmt: skip
        """The residency tier: decided from the autoscaler's idle time, demand and the forecast floor (not
        a pool's awake floor: a pool idle past ``warm_after_s`` sleeps); applied."""
        record = tick.records.get(deployment.name, ScalerRecord())
        demand = tick.waiting.get(deployment.name, 0) > 0 or any(_inflight(stats).values())
        return self.residency.apply(deployment, replicas, record.state.last_traffic, demand,
                                    tick.floors.get(deployment.name, 0), tick.now, engines).tier  # fmt: skip

    def _awake_floor(self, deployment: Deployment, replicas: list[Replica], engines: Engines,
                     tick: _Tick) -> int:  # fmt: skip
        """A pool's awake floor (``pools.awake_floor``) from its members' requests seen this tick; 0 for
        any other deployment."""
        if not is_pool(deployment.spec) or tick.awake is None:
            return 0
        members = tick.pools.members.get(deployment.name, [])
        seen = members_seen(members, replicas, engines, tick.asked, tick.now)
        return tick.awake.floor(deployment.name, _spec(deployment), seen, tick.now)

    def _waiting(self, deployment: Deployment, tick: _Tick) -> int:
        """The gateways' buffer for ``deployment``; for a pool, summed over its members (the gateway
        samples each member). A sample with requests waiting is noted in ``tick.asked``."""
        total = 0
        for name in tick.pools.names(deployment):
            newest = self._gateway_samples(name, tick.now)
            total += sum(s.gateway_waiting or 0 for s in newest)
            asked = [s.at for s in newest if s.gateway_waiting]
            if asked:
                tick.asked[name] = max(asked)
        return total

    def _gateway_waiting(self, name: str, now: datetime) -> int:
        """Requests buffered at every live gateway, summed."""
        return sum(s.gateway_waiting or 0 for s in self._gateway_samples(name, now))

    def _gateway_samples(self, name: str, now: datetime) -> list[EngineSample]:
        """Every live gateway's newest sample of ``name`` within the last ``GATEWAY_SAMPLE_AGE_S`` (a
        gateway that stopped reporting drops out)."""
        since = now - timedelta(seconds=GATEWAY_SAMPLE_AGE_S)
        newest = {s.source: s for s in self.store.engine_samples(name, since=since) if s.replica is None}
        return list(newest.values())

    def _scrape(self, name: str, replicas: list[Replica], now: datetime) -> dict[int, EngineStats]:
        from hpcserve.store import EngineSample

        targets = {r.index: engine_urls(r) for r in replicas if r.url and r.state in ("ready", "draining")}
        scraped = iter(self._scrape_all([url for urls in targets.values() for url in urls]))
        merged = {i: merge_stats([s for s in (next(scraped) for _ in urls) if s is not None])
                  for i, urls in targets.items()}  # fmt: skip
        stats = {i: s for i, s in merged.items() if s is not None}
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

    def _apply(self, deployment: Deployment, action: Action, tick: _Tick) -> None:
        name = deployment.name
        log.info("deployment %s: %s", name, action)
        match action:
            case Launch(index):
                spec = _spec(deployment)
                members = tick.pools.specs(deployment)
                pool = {"members": members} if members is not None else {}  # a pool's replica
                launched = self.launcher.launch(tick.submitter, deployment, spec, index, **pool)
                saw_change(self.client)  # submitted as the owner: the next tick sees the new job
                tick.launched_gpus[deployment.owner] += _gpus(spec, self._shards_per_gpu)
                self._record_launch(name, index, launched, tick.now)
            case SetState(index, state, url):
                fields: dict[str, Any] = {"state": state.value}
                if url is not None:
                    fields |= {"url": url, "ready_at": tick.now}
                self.store.upsert_replica(name, index, **fields)
            case Cancel(index, job_id, _):
                self.client.cancel([job_id])
                self.store.upsert_replica(name, index, state="dead", secret_hash=None, engine_key=None)
            case Forget(index, _):
                self.store.remove_replica(name, index)

    def _record_launch(self, name: str, index: int, launched: Launched, now: datetime) -> None:
        """The new replica's job id, secret hash and engine key; a job that cannot be recorded is cancelled
        at once: an unrecorded job is never trusted, so it would only hold the owner's GPUs."""
        try:
            self.store.upsert_replica(name, index, job_id=launched.job_id, state="starting", started_at=now,
                                      secret_hash=launched.secret_hash, engine_key=launched.engine_key,
                                      url=None, host=None, port=None, ready_at=None)  # fmt: skip
        except Exception:
            log.error("deployment %s: cannot record replica %d (job %s): cancelling it", name, index,
                      launched.job_id)  # fmt: skip
            self.client.cancel([launched.job_id])
            raise


def _spec(deployment: Deployment) -> DeploymentSpec:
    """The deployment's spec; a pool's: its replicas' shape."""
    from hpcserve.serving.spec import DeploymentSpec

    return DeploymentSpec.model_validate(as_replica_deployment(deployment).spec)


def _gpus(spec: DeploymentSpec, shards_per_gpu: int) -> float:
    """GPUs one replica holds; part of one for a ``gpu_fraction`` (the shards it takes)."""
    from hpcserve.jobs.policy import part_gpus

    return part_gpus(spec.gpus_per_replica * spec.nodes_per_replica, spec.gpu_fraction, shards_per_gpu)


def _replica_jobs(jobs: Sequence[Job]) -> dict[str, list[Job]]:
    """Live jobs tagged as replicas, by deployment: candidates only (``trusted_jobs`` decides)."""
    found: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        parsed = parse_replica_tag(job.tag)
        if parsed is not None:
            found[parsed[0]].append(job)
    return found


def _announcements(replicas: Sequence[Replica]) -> dict[int, Announcement]:
    """What starting replicas announced to the API (``url`` and the time, with the recorded job id)."""
    return {r.index: Announcement(r.job_id, r.url, r.ready_at, r.host or "") for r in replicas
            if r.state == "starting" and r.url and r.ready_at and r.job_id}  # fmt: skip


def _inflight(stats: Mapping[int, EngineStats]) -> dict[int, int]:
    return {index: (s.waiting or 0) + (s.running or 0) for index, s in stats.items()}


def _view(replica: Replica) -> ReplicaView:
    return ReplicaView(replica.index, replica.job_id or "0", ReplicaState(replica.state),
                       replica.started_at or replica.updated_at, replica.url)  # fmt: skip


def _draining_nodes(client: SlurmClient) -> frozenset[str]:
    """Nodes drained or draining (``hpcserve drain-node``, or an admin's scontrol): from the tick's shared
    sinfo, read only when the service has replicas in Slurm."""
    return frozenset(n.name for n in _read(client, "nodes") if "DRAIN" in n.flags)


def _read(client: SlurmClient, what: str) -> list[Any]:
    """The controller's squeue or sinfo: through a shared view, the calm read (``calm_jobs``: up to
    ``calm_read_s`` old while nothing moves), else the client's own."""
    calm = getattr(client, f"calm_{what}", None)
    return list(calm() if callable(calm) else getattr(client, what)())


def _steady(replicas: Sequence[Replica], stats: Mapping[int, EngineStats]) -> bool:
    """Every replica ready and its engine answered this tick's scrape."""
    return all(r.state == ReplicaState.READY.value and r.index in stats for r in replicas)


def _settle(client: object, calm: bool) -> None:
    """Tell a shared view of Slurm whether anything moves (``SharedView.settle``): while all is calm it
    reads Slurm less often."""
    settle = getattr(client, "settle", None)
    if callable(settle):
        settle(calm)


@dataclass
class StallWatch:
    """Which engines stalled: requests running, and their generated-token counter has not moved for
    ``stall_s`` (0: never looked for). Kept in the process: a restarted service looks again from scratch."""

    stall_s: float
    since: dict[tuple[str, int], tuple[float, datetime]] = field(default_factory=dict)

    def update(self, deployment: str, stats: Mapping[int, EngineStats], now: datetime) -> frozenset[int]:
        stalled = set()
        for index, s in stats.items():
            key = (deployment, index)
            last = self.since.get(key)
            if not s.running or last is None or s.generation_tokens_total != last[0]:
                self.since[key] = (s.generation_tokens_total, now)
            elif self.stall_s > 0 and (now - last[1]).total_seconds() >= self.stall_s:
                stalled.add(index)
        for key in [k for k in self.since if k[0] == deployment and k[1] not in stats]:
            del self.since[key]  # not scraped any more (gone, or not ready)
        return frozenset(stalled)
