"""``hpcserve service``: the service's options; the wiring lives in ``hpcserve.service.main``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import click

from hpcserve.identity import current_user

if TYPE_CHECKING:
    from hpcserve.cli.main import Context


@click.command()
@click.option("--once", is_flag=True, help="Run each job once and exit (for cron and tests).")
@click.option("--sample-interval", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds between queue samples (0: no sampler).")  # fmt: skip
@click.option("--rebalance-interval", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds between rebalance rounds (0: no rebalancing).")  # fmt: skip
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=9464, show_default=True,
              help="Port of /metrics on service.metrics_listen's host (0: none).")  # fmt: skip
@click.option("--no-shared-slurm-view", "own_reads", is_flag=True, hidden=True,
              help="Each job reads Slurm itself, as before the shared view (scripts/bench/slurm_load's "
                   "baseline).")  # fmt: skip
@click.pass_obj
def service(ctx: Context, /, once: bool, sample_interval: float, rebalance_interval: float,
            metrics_port: int, own_reads: bool) -> None:  # fmt: skip
    """Run hpcserve's service: the API (socket, munge over TCP), serving controller, queue sampler, rebalancer
    and history retention. It owns the database and migrates it at start."""
    from hpcserve.service.main import ServiceOptions, run_service

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    noisy = ("alembic.runtime.plugins", "apscheduler.executors.default", "apscheduler.scheduler", "httpx")
    for name in noisy:  # a line per plugin, two per job run, one per engine scrape (several a second)
        logging.getLogger(name).setLevel(logging.WARNING)
    site = ctx.require_site()
    policy = ctx.load_policy(site)
    store = ctx.store(site, extra_admins=(current_user(),), migrate=True)  # it owns the database
    options = ServiceOptions(once, sample_interval, rebalance_interval, metrics_port, not own_reads)
    run_service(site, policy, store, ctx.runner, options)
