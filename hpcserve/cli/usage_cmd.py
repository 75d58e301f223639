"""``hpcserve usage``: GPU-hours, cost and tokens per user, account, deployment, key or partition, through
the service (``GET /v1/usage``): your own jobs and keys, or everyone's for an admin."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from hpcserve.cli.main import JSON_HELP

if TYPE_CHECKING:
    from hpcserve.cli.main import Context

GROUP_BY = ("user", "account", "deployment", "key", "partition")  # hpcserve.usage.compute.GROUP_BY
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
COLUMNS = (
    ("group", "GROUP"), ("jobs", "JOBS"), ("gpu_hours", "GPU-H"), ("training_gpu_hours", "TRAIN"),
    ("inference_gpu_hours", "INFER"), ("busy_gpu_hours", "BUSY"), ("idle_gpu_hours", "IDLE"),
    ("unknown_util_gpu_hours", "UTIL?"), ("served_nothing_gpu_hours", "SERVED NOTHING"), ("cost", "COST"),
    ("requests", "REQUESTS"), ("tokens", "TOKENS"), ("cost_per_million_tokens", "COST/MTOK"),
)  # fmt: skip


def parse_since(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``3600s``, ``2w`` -> seconds; a plain number is days (as ``--since 7``
    was before)."""
    value = text.strip().lower()
    unit = UNITS.get(value[-1:])
    number = value[:-1] if unit is not None else value
    try:
        seconds = float(number) * (unit or UNITS["d"])
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise click.BadParameter(f"{text!r} is not a duration (fix: e.g. 30d, 12h, 90m, 3600s)")
    return seconds


@click.command(short_help="GPU-hours, cost and tokens (yours; everyone's for admins).")
@click.option("--since", "since_s", default="30d", show_default=True, callback=lambda c, p, v: parse_since(v),
              help="How far back: 30d, 12h, 90m, 3600s, 2w.")  # fmt: skip
@click.option("--by", type=click.Choice(GROUP_BY), default="user", show_default=True, help="Group by.")
@click.option("--hpcserve-only", is_flag=True, help="Only hpcserve's jobs (replicas and tagged jobs).")
@click.option("--jobs", "with_jobs", is_flag=True, help="With --json: each job's share too.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV, one line per group, then the total.")
@click.pass_obj
def usage(ctx: Context, /, since_s: float, by: str, hpcserve_only: bool, with_jobs: bool, as_json: bool,
          as_csv: bool) -> None:  # fmt: skip
    """GPU-hours from Slurm's accounting (allocated GPUs x time in the window; training/inference,
    busy/idle), their cost at the site's price per GPU-hour, and the gateway's tokens: cost per million
    tokens per deployment, and replica GPU-hours that served nothing."""
    from urllib.parse import urlencode

    from hpcserve.service.client import ServiceClient

    if as_json and as_csv:
        raise click.UsageError("--json and --csv: choose one")
    query = {"since_s": repr(round(since_s, 3)), "by": by}
    query |= {"hpcserve_only": "1"} if hpcserve_only else {}
    query |= {"jobs": "1"} if with_jobs else {}
    report = ServiceClient.for_site(ctx.load_site()).call("GET", f"/v1/usage?{urlencode(query)}")
    if as_json:
        from hpcserve.cli.output import emit_json

        emit_json(report)
    elif as_csv:
        _emit_csv(report)
    else:
        _emit_table(report)


def _rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [*report["groups"], {**report["total"], "group": "TOTAL"}]


def _emit_csv(report: dict[str, Any]) -> None:
    import csv
    import sys

    names = list(report["total"])
    writer = csv.DictWriter(sys.stdout, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in _rows(report):
        writer.writerow({name: "" if row[name] is None else row[name] for name in names})


def _emit_table(report: dict[str, Any]) -> None:
    from hpcserve.cli.output import emit_table

    def cell(value: Any) -> Any:
        return f"{value:.2f}" if isinstance(value, float) else value

    title = (f"usage by {report['by']} since {report['since'][:19]} ({report['scope']}; cost in "
             f"{report['currency']})")  # fmt: skip
    rows = [[cell(row[key]) for key, _ in COLUMNS] for row in _rows(report)]
    emit_table(title, [label for _, label in COLUMNS], rows)
