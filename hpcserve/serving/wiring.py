"""Builds the serving controller from the service's config, and runs its tick under the database's leader
lock, so two services never both act on the same deployments.

Only the service builds it: it submits every owner's replicas as that owner (``service.submit_as``), which
takes root (``runuser``, ``sbatch --uid``) or a sudoers rule (``sudo``); a process that could not do that is
refused here, at once, rather than at its first submission. Users act through the service's API.
"""

from __future__ import annotations

import functools
import logging
import os
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from hpcserve.identity import current_user
from hpcserve.serving.controller import ServingController, StallWatch
from hpcserve.serving.launcher import ReplicaLauncher
from hpcserve.store.leases import holder_id, take_lease

if TYPE_CHECKING:
    import httpx

    from hpcserve.config import Policy, SiteConfig
    from hpcserve.serving.engine_stats import EngineStats
    from hpcserve.serving.overlap import GentleEvictor, PrewarmSource
    from hpcserve.slurm.protocol import SlurmClient
    from hpcserve.store import HistoryStore

log = logging.getLogger("hpcserve.serving")
LOCK = "serving-controller"


@functools.cache
def _scrape_client() -> httpx.Client:
    """One kept-alive client for every scrape, in every thread (httpx.Client is thread-safe). A client per
    call (``httpx.get``) built an SSL context and a pool each time: the service's memory grew by ~30 MiB in
    a 30-minute soak, and each scrape paid a new connection."""
    import httpx

    return httpx.Client(timeout=1.0)


def scrape_metrics(url: str) -> EngineStats | None:
    """The engine's /metrics, parsed; None when it does not answer within a second."""
    import httpx

    from hpcserve.serving.engine_stats import EngineMetricsError, parse_engine_metrics

    try:
        response = _scrape_client().get(f"{url}/metrics")
        response.raise_for_status()
        return parse_engine_metrics(response.text)
    except (httpx.HTTPError, EngineMetricsError) as exc:
        log.warning("cannot scrape %s/metrics: %s", url, exc)
        return None


def make_launcher(site: SiteConfig) -> ReplicaLauncher:
    """Replicas submitted as their owners, in the way the site chose, announcing to this service's API;
    with ``lending: overlap`` held, so that hpcserve, not Slurm, chooses whom a replica preempts."""
    from hpcserve.jobs.runas import check_service_identity, owner_environ
    from hpcserve.service.client import SOCKET_ENV
    from hpcserve.slurm.runner import SubprocessRunner

    check_service_identity(site.service.submit_as, os.geteuid())
    return ReplicaLauncher(
        replica_dir=site.serving.replica_path(),
        method=site.service.submit_as,
        runner=SubprocessRunner(env=owner_environ(os.environ)),
        service_socket=os.environ.get(SOCKET_ENV) or site.service.socket,  # where the API listens
        service_url=site.service.url,
        ready_timeout_s=site.serving.ready_timeout_s,
        timeout_s=site.slurm.command_timeout_s,
        hold=site.lending.mode == "overlap",
        env=site.serving.replica_env,
        storage=site.storage,
        shards_per_gpu=site.serving.shards_per_gpu,
    )


def make_controller(
    site: SiteConfig, policy: Policy, store: HistoryStore, client: SlurmClient | None = None
) -> ServingController:
    from hpcserve.jobs.submit import Submitter
    from hpcserve.slurm.factory import make_client

    slurm = client or make_client(site)
    return ServingController(
        store=store,
        client=slurm,
        submitter=lambda: Submitter(slurm, site, policy),
        launcher=make_launcher(site),
        policy=policy,
        ready_timeout_s=site.serving.ready_timeout_s,
        renew_before_s=site.serving.renew_before_s,
        stalls=StallWatch(site.serving.stall_s),
        scrape=scrape_metrics,
        service_user=current_user(),
        prewarm=_prewarm(site, policy, store),
        evict=_evictor(site, policy, slurm, store),
    )


def _evictor(
    site: SiteConfig, policy: Policy, slurm: SlurmClient, store: HistoryStore
) -> GentleEvictor | None:
    """Gentle victims, in ``lending: overlap`` only; markers from ``lending.checkpoint_dir`` (else the
    service's ``$HPCSERVE_CHECKPOINT_DIR``)."""
    if site.lending.mode != "overlap":
        return None
    from pathlib import Path

    from hpcserve.jobs.resumable import MARKER_DIR_ENV
    from hpcserve.serving.overlap import GentleEvictor

    folder = site.lending.checkpoint_dir or os.environ.get(MARKER_DIR_ENV)
    pin = getattr(slurm, "pin_job", None)  # an operator backend (the CLI's) can pin; a read-only one cannot
    return GentleEvictor(
        slurm,
        policy,
        frozenset(site.lending.shared_nodes),
        Path(folder) if folder else None,
        pin,
        store,
        site.lending.grace_time_s,
        inference_nodes=frozenset(site.partitions.inference.nodes),
        training_nodes=frozenset(site.partitions.training.nodes),
        release=getattr(slurm, "release", None),
    )


def _prewarm(site: SiteConfig, policy: Policy, store: HistoryStore) -> PrewarmSource | None:
    """The forecast floor, in ``lending: overlap`` only (``moves``: none, the autoscaler alone)."""
    if site.lending.mode != "overlap":
        return None
    from hpcserve.serving.overlap import PrewarmSource
    from hpcserve.serving.prewarm import Forecasting, prewarm_horizon_s

    rules = policy.prewarm
    horizon = prewarm_horizon_s(
        site.lending.grace_time_s,
        site.serving.ready_timeout_s,
        site.serving.controller_interval_s,
        rules.start_estimate_s,
    )
    how = Forecasting(rules.profile_slot_s, rules.halflife_s, rules.min_history_s)
    return PrewarmSource(store, horizon, how)


def tick_as_leader(controller: ServingController, store: HistoryStore, ttl_s: float) -> bool:
    """One controller tick if this process holds (or takes) the leader lock; False when another does."""
    if not take_lease(store, LOCK, holder_id(), ttl_s, datetime.now(UTC)):
        return False
    controller.tick()
    return True
