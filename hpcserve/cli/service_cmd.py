"""``hpcserve service``: hpcserve's scheduler process (APScheduler).

Each job is one tick of load -> decide -> apply -> record; an error is logged and the next tick runs as
planned, it never reaches the scheduler. Only the process holding the database's leader lock acts, so
two services (or a service and ``hpcserve serve --wait``) never both submit or cancel.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click

from hpcserve.identity import current_user

if TYPE_CHECKING:
    from hpcserve.cli.main import Context

log = logging.getLogger("hpcserve.service")


def _guarded(name: str, func: object) -> object:
    """``func`` with its errors logged instead of raised into the scheduler."""

    def run() -> None:
        try:
            func()  # type: ignore[operator]
        except Exception:
            log.exception("%s failed; the next tick runs as planned", name)

    return run


@click.command()
@click.option("--once", is_flag=True, help="Run each job once and exit (for cron and tests).")
@click.pass_obj
def service(ctx: Context, /, once: bool) -> None:
    """Run hpcserve's scheduler: serving controller (reconcile + autoscale) and history retention."""
    from apscheduler.schedulers.blocking import BlockingScheduler  # type: ignore[import-untyped]

    from hpcserve.serving.wiring import make_controller, tick_as_leader

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    site = ctx.require_site()
    policy = ctx.load_policy(site)
    store = ctx.store(site, extra_admins=(_me(),))
    interval = site.serving.controller_interval_s
    controller = make_controller(site, policy, store)
    jobs = {
        "serving": (lambda: tick_as_leader(controller, store, ttl_s=max(10 * interval, 10)), interval),
        "retention": (lambda: store.apply_retention(datetime.now(UTC)), 3600.0),
    }
    if once:
        for name, (func, _) in jobs.items():
            _guarded(name, func)()  # type: ignore[operator]
        return
    scheduler = BlockingScheduler(timezone=UTC)
    for name, (func, seconds) in jobs.items():
        scheduler.add_job(_guarded(name, func), "interval", seconds=seconds, id=name, max_instances=1,
                          coalesce=True, next_run_time=datetime.now(UTC))  # fmt: skip
    log.info("hpcserve service: %s", ", ".join(f"{n} every {s:g}s" for n, (_, s) in jobs.items()))
    scheduler.start()


def _me() -> str:

    return current_user()
