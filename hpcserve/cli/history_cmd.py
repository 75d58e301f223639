"""``hpcserve history``: the queue samples the service recorded, as a table, JSON or a PNG plot of queue depth
per partition with the training/inference split (nodes per side) over time."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from hpcserve.cli.main import Context
    from hpcserve.config import SiteConfig
    from hpcserve.rebalance.types import Side
    from hpcserve.store import HistoryStore, QueueSample

JSON_HELP = "Print machine-readable JSON instead of a table."
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
COLUMNS = ("AT", "PARTITION", "PENDING JOBS", "PENDING GPUS", "RUNNING GPUS", "IDLE GPUS", "TOTAL GPUS")


def parse_since(text: str) -> timedelta:
    """``90m``, ``24h``, ``7d``, ``2w``, ``30s`` -> a timedelta."""
    from hpcserve.errors import ValidationError

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if match is None:
        raise ValidationError(f"--since {text!r}: expected a number and a unit, e.g. 90m, 24h or 7d")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2]])


@click.command()
@click.option("-p", "--partition", help="Only this partition.")
@click.option("--since", default="24h", show_default=True, help="How far back: 90m, 24h, 7d.")
@click.option("--limit", type=click.IntRange(0), default=200, show_default=True,
              help="Table and JSON: the newest N samples only (0: all).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a PNG of queue depth and nodes per side (needs hpcserve[plot]).")  # fmt: skip
@click.pass_obj
def history(ctx: Context, partition: str | None, since: str, limit: int, as_json: bool,
            plot: Path | None) -> None:  # fmt: skip
    """Queue samples per partition (pending jobs and GPUs, running, idle and total GPUs) over time."""
    site = ctx.require_site()
    start = datetime.now(UTC) - parse_since(since)
    store = ctx.store(site)
    samples = store.queue_samples(partition, since=start)
    shown = samples[-limit:] if limit else samples
    if plot is not None:
        from hpcserve.cli.history_plot import plot_history

        plot_history(plot, samples, split_points(site, store, start), site.partition_names())
    if as_json:
        from hpcserve.cli.output import emit_json

        emit_json(shown)
    else:
        _print(shown, len(samples))
    if plot is not None and not as_json:
        click.echo(f"wrote {plot}")


def _print(samples: list[QueueSample], total: int) -> None:
    from hpcserve.cli.output import emit_table

    rows = [(s.at.isoformat(timespec="seconds"), s.partition, s.pending_jobs, s.pending_gpus, s.running_gpus,
             s.idle_gpus, s.total_gpus) for s in samples]  # fmt: skip
    title = f"{len(samples)} samples" + (
        f" (newest of {total}; --limit 0 shows all)" if total > len(samples) else ""
    )
    emit_table(title, COLUMNS, rows)


def split_points(site: SiteConfig, store: HistoryStore, start: datetime) -> list[tuple[datetime, int, int]]:
    """Nodes per side from ``start`` on: the site's starting split, then each move carried out."""
    from hpcserve.rebalance.split import split_timeline
    from hpcserve.rebalance.types import Side

    base: dict[str, Side] = dict.fromkeys(site.partitions.training.nodes, Side.TRAINING)
    base.update(dict.fromkeys(site.partitions.inference.nodes, Side.INFERENCE))
    return split_timeline(start, base, _move_events(store))


def _move_events(store: HistoryStore) -> list[tuple[datetime, str, Side]]:
    from hpcserve.rebalance.types import Side

    return [(s.finished_at, s.node, Side(s.dst)) for s in store.done_moves() if s.finished_at is not None]
