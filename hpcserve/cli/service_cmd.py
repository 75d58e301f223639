"""``hpcserve service``: hpcserve's scheduler process (APScheduler).

Each job is one tick of load -> decide -> apply -> record; an error is logged and the next tick runs as
planned, it never reaches the scheduler. A database that went away (a PostgreSQL restart) is one log line
per tick until it is back; the engine checks pooled connections before use (``pool_pre_ping``), so the
next tick reconnects. Only the process holding a job's database lease acts (the serving controller's,
and "rebalance", shared with ``hpcserve rebalance --apply`` from cron), so two processes never both act.

Jobs: serving (reconcile + autoscale), sampler (queue samples), rebalance (finish crashed plans, re-assert
the split, plan and move nodes), retention. ``--metrics-port`` serves their counters on /metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from hpcserve.identity import current_user

if TYPE_CHECKING:
    from hpcserve.cli.main import Context
    from hpcserve.cli.service_metrics import ServiceMetrics
    from hpcserve.config import Policy, SiteConfig
    from hpcserve.rebalance.control import RoundReport
    from hpcserve.store import HistoryStore

log = logging.getLogger("hpcserve.service")
Jobs = dict[str, tuple[Callable[[], object], float]]


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


@click.command()
@click.option("--once", is_flag=True, help="Run each job once and exit (for cron and tests).")
@click.option("--sample-interval", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds between queue samples (0: no sampler).")  # fmt: skip
@click.option("--rebalance-interval", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds between rebalance rounds (0: no rebalancing).")  # fmt: skip
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=9464, show_default=True,
              help="Port of the Prometheus /metrics endpoint (0: none).")  # fmt: skip
@click.pass_obj
def service(ctx: Context, /, once: bool, sample_interval: float, rebalance_interval: float,
            metrics_port: int) -> None:  # fmt: skip
    """Run hpcserve's scheduler: serving controller, queue sampler, rebalancer and history retention."""
    from hpcserve.cli.service_metrics import ServiceMetrics

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # a line per plugin, each start
    site = ctx.require_site()
    policy = ctx.load_policy(site)
    store = ctx.store(site, extra_admins=(current_user(),), migrate=True)  # it owns the database
    metrics = ServiceMetrics()
    jobs = _serving_jobs(site, policy, store)
    if sample_interval > 0:
        jobs["sampler"] = (_sampler_tick(site, store, metrics), sample_interval)
    if rebalance_interval > 0:
        jobs["rebalance"] = (
            _rebalance_tick(ctx, site, policy, store, metrics, rebalance_interval),
            rebalance_interval,
        )
    if once:
        for name, (func, _) in jobs.items():
            _guarded(name, func, metrics)()
        return
    if metrics_port:
        _serve_metrics(metrics, metrics_port, site)
    _schedule(jobs, metrics)


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
        scheduler.add_job(_guarded(name, func, metrics), "interval", seconds=seconds, id=name,
                          max_instances=1, coalesce=True, next_run_time=datetime.now(UTC))  # fmt: skip
    log.info("hpcserve service: %s", ", ".join(f"{n} every {s:g}s" for n, (_, s) in jobs.items()))
    scheduler.start()


def _serving_jobs(site: SiteConfig, policy: Policy, store: HistoryStore) -> Jobs:
    from hpcserve.serving.wiring import make_controller, tick_as_leader

    interval = site.serving.controller_interval_s
    controller = make_controller(site, policy, store)
    return {
        "serving": (lambda: tick_as_leader(controller, store, ttl_s=max(10 * interval, 10)), interval),
        "retention": (lambda: store.apply_retention(datetime.now(UTC)), 3600.0),
    }


def _sampler_tick(site: SiteConfig, store: HistoryStore, metrics: ServiceMetrics) -> Callable[[], None]:
    from hpcserve.rebalance.sampler import Sampler
    from hpcserve.slurm.factory import make_client

    sampler = Sampler(make_client(site), store)

    def tick() -> None:
        try:
            sampler.tick()
        finally:
            metrics.sampled(sampler)

    return tick


def _rebalance_tick(ctx: Context, site: SiteConfig, policy: Policy, store: HistoryStore,
                    metrics: ServiceMetrics, interval: float) -> Callable[[], None]:  # fmt: skip
    from hpcserve.rebalance.control import Rebalancer, default_plan_fn
    from hpcserve.slurm.cli_backend import CliSlurmClient

    client = CliSlurmClient(ctx.runner, timeout=site.slurm.command_timeout_s)
    ttl_s = max(3 * interval, 120.0)
    rebalancer = Rebalancer(client, store, site, policy, default_plan_fn(), ttl_s=ttl_s)

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
