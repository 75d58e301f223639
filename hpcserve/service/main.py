"""The service's composition root: its scheduler jobs (APScheduler) and its API, wired from the service's own
config, store and Slurm client.

Each job is one tick of load -> decide -> apply -> record; an error is logged and the next tick runs as
planned, it never reaches the scheduler. A database that went away (a PostgreSQL restart) is one log line
per tick until it is back; the engine checks pooled connections before use (``pool_pre_ping``), so the
next tick reconnects. Only the process holding a job's database lease acts (the serving controller's,
and "rebalance", shared with ``hpcserve rebalance --apply`` from cron), so two processes never both act.

Jobs: serving (reconcile + autoscale), sampler (queue samples), rebalance (finish crashed plans, re-assert
the split, plan and move nodes), retention, idle (GPU idle flags), gpu_sacct (slurmd's GPU usage). The API
serves users on the socket (see ``http.py``); /metrics serves the jobs' counters on the admin address.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

    from hpcserve.config import Policy, SiteConfig
    from hpcserve.rebalance.control import RoundReport
    from hpcserve.service.metrics import ServiceMetrics
    from hpcserve.service.server import ApiServer
    from hpcserve.slurm.protocol import SlurmClient, SlurmReader
    from hpcserve.slurm.runner import SubprocessRunner
    from hpcserve.slurm.shared_view import SharedView
    from hpcserve.store import HistoryStore

log = logging.getLogger("hpcserve.service")
RETENTION_S = 3600.0
METRICS_INTERVAL_S = 15.0
Jobs = dict[str, tuple[Callable[[], object], float]]


@dataclass(frozen=True, slots=True)
class ServiceOptions:
    once: bool = False  # each job once, then exit (cron, tests); no API
    sample_interval_s: float = 30.0  # 0: no sampler
    rebalance_interval_s: float = 60.0  # 0: no rebalancing
    metrics_port: int = 9464  # 0: no /metrics
    shared_view: bool = True  # False: each job reads Slurm itself (the benchmark's baseline)


def run_service(site: SiteConfig, policy: Policy, store: HistoryStore, runner: SubprocessRunner,
                options: ServiceOptions) -> None:  # fmt: skip
    """Run the jobs (and, unless ``once``, the API and /metrics) until the process is stopped."""
    from hpcserve.service.metrics import ServiceMetrics

    metrics = ServiceMetrics(site.cost.price)
    shared = _shared_view(site, options)
    jobs = _jobs(site, policy, store, runner, metrics, options, shared)
    if options.once:
        for name, (func, _) in jobs.items():
            _guarded(name, func, metrics)()
        return
    if options.metrics_port:
        _serve_metrics(metrics, options.metrics_port, site)
    api = start_api(site, policy, store, shared)
    try:
        _schedule(jobs, metrics)
    finally:
        api.stop()


def _shared_view(site: SiteConfig, options: ServiceOptions) -> SharedView | None:
    """The service's one read of Slurm per tick, shared by its jobs and its API (None: the baseline)."""
    from hpcserve.slurm.factory import make_client
    from hpcserve.slurm.shared_view import SharedView

    if not options.shared_view:
        return None
    return SharedView(make_client(site), site.serving.controller_interval_s, calm_s=site.serving.calm_read_s)


def _jobs(site: SiteConfig, policy: Policy, store: HistoryStore, runner: SubprocessRunner,
          metrics: ServiceMetrics, options: ServiceOptions, shared: SharedView | None) -> Jobs:  # fmt: skip
    from hpcserve.slurm.factory import make_client

    jobs = _serving_jobs(site, policy, store, shared or make_client(site))
    if options.sample_interval_s > 0:
        sampler = _sampler_tick(shared or make_client(site), store, metrics, options.sample_interval_s)
        ttl_s = max(3 * options.sample_interval_s, 60.0)
        jobs["sampler"] = (leased(store, "sampler", ttl_s, sampler), options.sample_interval_s)
    if options.rebalance_interval_s > 0:
        interval = options.rebalance_interval_s
        rebalance = _rebalance_tick(runner, site, policy, store, metrics, interval, shared)
        jobs["rebalance"] = (rebalance, interval)
    jobs["metrics"] = (_metrics_tick(store, metrics, options), METRICS_INTERVAL_S)
    jobs["idle"] = _idle_job(store, policy, metrics, shared or make_client(site))
    jobs["gpu_sacct"] = _sacct_gpu_job(runner, site, store)
    return jobs


def _sacct_gpu_job(runner: SubprocessRunner, site: SiteConfig,
                   store: HistoryStore) -> tuple[Callable[[], object], float]:  # fmt: skip
    """slurmd's own GPU usage from sacct (``hpcserve.service.sacct_gpu``), under the lease "gpu_sacct"."""
    from hpcserve.service.sacct_gpu import INTERVAL_S, SacctGpu

    reader = SacctGpu(runner, store, site.slurm.command_timeout_s)
    return leased(store, "gpu_sacct", 3 * INTERVAL_S, reader.tick), INTERVAL_S


def _idle_job(store: HistoryStore, policy: Policy, metrics: ServiceMetrics,
              view: SlurmReader) -> tuple[Callable[[], object], float]:  # fmt: skip
    """The idle tick (``hpcserve.service.idle_tick``) under the lease "idle", on the controller's read of
    the jobs (no Slurm RPC of its own); and its GPU telemetry collector on /metrics."""
    from hpcserve.service.idle_tick import IdleTick, tick_interval_s
    from hpcserve.service.metrics_telemetry import TelemetryCollector

    idle = IdleTick(getattr(view, "calm_jobs", view.jobs), store, policy.idle)
    metrics.registry.register(TelemetryCollector(store, policy.idle, lambda: idle.running))
    interval = tick_interval_s(policy.idle)
    return leased(store, "idle", max(3 * interval, 60.0), idle.tick), interval


def _metrics_tick(
    store: HistoryStore, metrics: ServiceMetrics, options: ServiceOptions
) -> Callable[[], None]:
    """/metrics' figures from the database: replicas, plans, evictions, and the leases this process holds."""
    from hpcserve.serving.wiring import LOCK
    from hpcserve.store.leases import holder_id

    leases = [LOCK, "retention", "idle", *(["sampler"] if options.sample_interval_s > 0 else [])]
    return partial(metrics.look, store, holder_id(), leases)


def _guarded(
    name: str, func: Callable[[], object], metrics: ServiceMetrics | None = None
) -> Callable[[], None]:
    """``func`` with its errors logged instead of raised into the scheduler (and counted)."""
    from sqlalchemy.exc import DBAPIError

    from hpcserve.errors import SlurmCommandError
    from hpcserve.store import DatabaseUnavailable

    def run() -> None:
        if metrics is not None:
            metrics.ticked(name)
        try:
            func()
        except (DatabaseUnavailable, DBAPIError) as exc:
            _count(metrics, name)
            first = str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__]
            log.warning("%s: database unavailable (%s); the next tick retries", name, first[0])
        except SlurmCommandError as exc:  # slurmctld down or slow: expected in operation, no traceback
            _count(metrics, name)
            log.warning("%s: Slurm command failed (%s); the next tick retries", name, exc)
        except Exception:
            _count(metrics, name)
            log.exception("%s failed; the next tick runs as planned", name)

    return run


def _count(metrics: ServiceMetrics | None, name: str) -> None:
    if metrics is not None:
        metrics.failed(name)


def start_api(
    site: SiteConfig, policy: Policy, store: HistoryStore, shared: SharedView | None = None
) -> ApiServer:
    """The HTTP API on the service's socket (and TCP with munge, when ``service.listen`` is set). With the
    service's ``shared`` view of Slurm, the API's checks of a job's owner use its last read."""
    from hpcserve.api.context import ApiContext
    from hpcserve.service.client import SOCKET_ENV
    from hpcserve.service.http import Transport, make_api_app
    from hpcserve.service.routes import route_tables
    from hpcserve.service.server import ApiServer
    from hpcserve.slurm.factory import make_client

    api = ApiContext(site, policy, store, shared if shared is not None else make_client(site))
    tables = route_tables()

    def make_app(transport: Transport) -> web.Application:
        return make_api_app(api, tables, transport)

    socket_path = Path(os.environ.get(SOCKET_ENV) or site.service.socket)
    server = ApiServer(make_app, socket_path, site.service.listen)
    server.start()
    return server


def _serve_metrics(metrics: ServiceMetrics, port: int, site: SiteConfig) -> None:
    """/metrics on ``port`` of the admin host of ``service.metrics_listen`` (never every address); a port
    already taken (another service) costs the metrics, not the service."""
    host = site.service.metrics_listen.rpartition(":")[0].strip("[]")
    try:
        metrics.serve(port, host)
    except OSError as exc:
        log.warning("no /metrics: cannot listen on %s:%d (%s); pass --metrics-port", host, port, exc.strerror)
        return
    log.info("metrics on http://%s:%d/metrics", host, port)


def _schedule(jobs: Jobs, metrics: ServiceMetrics) -> None:
    from apscheduler.schedulers.blocking import BlockingScheduler  # type: ignore[import-untyped]

    scheduler = BlockingScheduler(timezone=UTC)
    for name, (func, seconds) in jobs.items():
        scheduler.add_job(_guarded(name, func, metrics), "interval", seconds=seconds, id=name, name=name,
                          max_instances=1, coalesce=True, next_run_time=datetime.now(UTC))  # fmt: skip
    log.info("hpcserve service: %s", ", ".join(f"{n} every {s:g}s" for n, (_, s) in jobs.items()))
    scheduler.start()


def _serving_jobs(site: SiteConfig, policy: Policy, store: HistoryStore, view: SlurmClient) -> Jobs:
    from hpcserve.serving.wiring import make_controller, tick_as_leader

    interval = site.serving.controller_interval_s
    controller = make_controller(site, policy, store, view)
    retention = leased(store, "retention", 2 * RETENTION_S, lambda: store.apply_retention(datetime.now(UTC)))
    return {
        "serving": (lambda: tick_as_leader(controller, store, ttl_s=max(10 * interval, 10)), interval),
        "retention": (retention, RETENTION_S),
    }


def leased(
    store: HistoryStore, name: str, ttl_s: float, func: Callable[[], object], holder: str | None = None
) -> Callable[[], bool]:
    """``func`` run only while this process holds the lease ``name`` (taken or renewed on each call), so a
    second service on the same database stands by instead of doing it twice; whether it ran."""
    from hpcserve.store.leases import holder_id, take_lease

    me = holder or holder_id()

    def run() -> bool:
        if not take_lease(store, name, me, ttl_s, datetime.now(UTC)):
            return False
        func()
        return True

    return run


def _sampler_tick(view: SlurmReader, store: HistoryStore, metrics: ServiceMetrics,
                  interval_s: float) -> Callable[[], None]:  # fmt: skip
    from hpcserve.rebalance.sampler import Sampler
    from hpcserve.slurm.shared_view import SharedView

    # through the shared view: a read up to min(calm, its period) old while calm, dated when it was read
    timed = metrics.reading(partial(view.timed_read, interval_s)) if isinstance(view, SharedView) else None
    sampler = Sampler(view, store, timed=timed)

    def tick() -> None:
        try:
            sampler.tick()
        finally:
            metrics.sampled(sampler)

    return tick


def _rebalance_tick(runner: SubprocessRunner, site: SiteConfig, policy: Policy, store: HistoryStore,
                    metrics: ServiceMetrics, interval: float,
                    view: SharedView | None) -> Callable[[], None]:  # fmt: skip
    from hpcserve.rebalance.control import Rebalancer, default_plan_fn
    from hpcserve.slurm.cli_backend import CliSlurmClient

    client = CliSlurmClient(runner, timeout=site.slurm.command_timeout_s)
    ttl_s = max(3 * interval, 120.0)
    planner_view = view.calm_reader(interval / 3) if view is not None else None  # older while calm
    rebalancer = Rebalancer(client, store, site, policy, default_plan_fn(), ttl_s=ttl_s, view=planner_view)

    def tick() -> None:
        report = rebalancer.round()
        _log_round(report)
        metrics.rebalanced(report)

    return tick


def _log_round(report: RoundReport) -> None:
    """One line for a plan the round carried out, with its reasons (the executor logs its steps, repairs
    and re-asserted partitions itself)."""
    if report.locked:
        log.info("rebalance: another process holds the lock; skipped")
    if report.plan is not None and report.plan_id is not None:
        moves = ", ".join(f"{m.node} {m.src.value}->{m.dst.value}" for m in report.plan.moves)
        log.info("rebalance: plan %d %s (%s): %s", report.plan_id, report.state, moves,
                 "; ".join(report.plan.reasons))  # fmt: skip
