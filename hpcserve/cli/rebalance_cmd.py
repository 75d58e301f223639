"""``hpcserve rebalance``: move managed-pool nodes between the training and inference partitions.

``--dry-run`` (the default) prints what the planner would move and why. ``--apply`` takes the database
lease "rebalance" (a second run at the same time exits 0 and says so: safe from cron), finishes any plan a
crashed run left, resumes nodes hpcserve left drained, re-asserts the stored split, then persists and
carries out the new plan. ``--move NODE=SIDE`` replaces the planner with a hand-made plan. ``--plans``
lists the recent plans (which process last ran each, and when it finished).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from hpcserve.cli.main import Context
    from hpcserve.rebalance.control import Rebalancer, RoundReport
    from hpcserve.rebalance.types import RebalancePlan

JSON_HELP = "Print machine-readable JSON instead of text."


@click.command()
@click.option("--dry-run", "mode", flag_value="dry-run", default=True, help="Show the plan only (default).")
@click.option("--apply", "mode", flag_value="apply", help="Carry the plan out (under the rebalance lock).")
@click.option("--plans", "mode", flag_value="plans",
              help="List the recent plans: state, who ran them, when they finished.")  # fmt: skip
@click.option("--move", "moves", multiple=True, metavar="NODE=SIDE",
              help="Move a managed node by hand instead of planning, e.g. node5=training.")  # fmt: skip
@click.option("--grace-s", type=click.IntRange(0), help="Grace for preemptible jobs on --move nodes.")
@click.option("--lock-ttl", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Seconds the lock lasts unrenewed (a killed run's lock expires after it).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_obj
def rebalance(ctx: Context, mode: str, moves: tuple[str, ...], grace_s: int | None, lock_ttl: float,
              as_json: bool) -> None:  # fmt: skip
    """Plan (--dry-run) or carry out (--apply) node moves between training and inference."""
    from hpcserve.rebalance.control import parse_moves

    if mode == "plans":
        _list_plans(ctx, as_json)
        return
    wanted = parse_moves(moves)
    rebalancer = _rebalancer(ctx, lock_ttl, manual=bool(wanted))
    if mode == "dry-run":
        _show_plan(rebalancer.manual_plan(wanted, grace_s) if wanted else rebalancer.plan()[0], as_json)
        return
    report = rebalancer.round(wanted, grace_s)
    if as_json:
        from hpcserve.api.admin import report_json
        from hpcserve.cli.output import emit_json

        emit_json(report_json(report))
    else:
        _print_report(report)
    if report.state not in (None, "done"):
        raise click.exceptions.Exit(1)


def _rebalancer(ctx: Context, lock_ttl: float, manual: bool) -> Rebalancer:
    from hpcserve.rebalance.control import Rebalancer, default_plan_fn
    from hpcserve.slurm.cli_backend import CliSlurmClient

    site = ctx.require_site()
    policy = ctx.load_policy(site)
    client = CliSlurmClient(ctx.runner, timeout=site.slurm.command_timeout_s)
    plan_fn = None if manual else default_plan_fn()
    return Rebalancer(client, ctx.store(site), site, policy, plan_fn, ttl_s=lock_ttl)


def _show_plan(plan: RebalancePlan, as_json: bool) -> None:
    if as_json:
        from hpcserve.api.admin import plan_json
        from hpcserve.cli.output import emit_json

        emit_json(plan_json(plan))
        return
    from hpcserve.cli.output import emit_table

    click.echo(f"target: {plan.target_inference_nodes} managed nodes on the inference side")
    for reason in plan.reasons:
        click.echo(f"  because: {reason}")
    if plan.empty:
        click.echo("nothing to move")
        return
    rows = [(m.node, m.src.value, m.dst.value, ",".join(m.preempt), m.grace_s, m.reason) for m in plan.moves]
    emit_table(f"{len(plan.moves)} moves", ("NODE", "FROM", "TO", "PREEMPT", "GRACE S", "REASON"), rows)


def _print_report(report: RoundReport) -> None:
    from hpcserve.hostlists import collect

    if report.locked:
        click.echo("another hpcserve rebalance holds the lock 'rebalance': nothing done")
        return
    if report.resumed:
        click.echo(f"finished plans a previous run left: {', '.join(map(str, report.resumed))}")
    if report.repaired:
        click.echo(f"resumed nodes left drained by hpcserve: {collect(report.repaired)}")
    for name, nodes in report.reasserted.items():
        click.echo(f"re-asserted the split: {name}={collect(nodes)}")
    if report.plan_id is None:
        reasons = "; ".join(report.plan.reasons) if report.plan is not None else ""
        click.echo("nothing to move" + (f" ({reasons})" if reasons else ""))
        return
    assert report.plan is not None
    moved = ", ".join(f"{m.node} {m.src}->{m.dst}" for m in report.plan.moves)
    click.echo(f"plan {report.plan_id}: {report.state} ({moved})")


RECENT_PLANS = 20


def _list_plans(ctx: Context, as_json: bool) -> None:
    """The recent plans, from the service's API (cluster facts anyone may read; no database opened)."""
    from hpcserve.cli.serve_cmds import service_client

    recent: list[dict[str, Any]] = service_client(ctx).call("GET", f"/v1/plans?last={RECENT_PLANS}")
    if as_json:
        from hpcserve.cli.output import emit_json

        emit_json(recent)
        return
    from hpcserve.cli.output import emit_table

    rows = [(p["id"], p["state"], _when(p["created_at"]), _when(p["finished_at"]), p["holder"] or "-",
             ", ".join(f"{m['node']}->{m['dst']}" for m in p["moves"])) for p in recent]  # fmt: skip
    emit_table(f"{len(recent)} plans", ("PLAN", "STATE", "CREATED", "FINISHED", "LAST RUN BY", "MOVES"), rows)


def _when(at: str | None) -> str:
    return datetime.fromisoformat(at).isoformat(timespec="seconds") if at is not None else "-"
