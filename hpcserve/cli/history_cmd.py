"""``hpcserve history``: the queue samples the service recorded, as a table, JSON or a PNG plot of queue depth
per partition with the training/inference split (nodes per side) over time. The samples come from the
service's API (cluster facts anyone may read); the plot is drawn here, from that JSON."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import click

if TYPE_CHECKING:
    from hpcserve.cli.main import Context

JSON_HELP = "Print machine-readable JSON instead of a table."
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
COLUMNS = ("AT", "PARTITION", "PENDING JOBS", "PENDING GPUS", "RUNNING GPUS", "IDLE GPUS", "TOTAL GPUS")


@dataclass(frozen=True, slots=True)
class Sample:
    """One queue sample as the API sends it (``hpcserve.store.QueueSample``'s fields)."""

    at: datetime
    partition: str
    pending_jobs: int
    pending_gpus: int
    running_gpus: int
    idle_gpus: int
    total_gpus: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sample:
        counts = (
            data[k] for k in ("pending_jobs", "pending_gpus", "running_gpus", "idle_gpus", "total_gpus")
        )
        return cls(datetime.fromisoformat(data["at"]), data["partition"], *counts)


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
@click.option("--lost", is_flag=True,
              help="Instead: the training jobs evicted for replicas (lending: overlap) and the GPU-hours "
                   "each lost since its last checkpoint.")  # fmt: skip
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write a PNG of queue depth and nodes per side (needs hpcserve[plot]).")  # fmt: skip
@click.pass_obj
def history(ctx: Context, partition: str | None, since: str, limit: int, as_json: bool, lost: bool,
            plot: Path | None) -> None:  # fmt: skip
    """Queue samples per partition (pending jobs and GPUs, running, idle and total GPUs) over time."""
    from hpcserve.cli.serve_cmds import service_client

    if lost:
        if plot is not None or partition:
            raise click.UsageError("--lost takes neither --plot nor --partition (fix: drop them)")
        _lost(service_client(ctx).call("GET", "/v1/lost-work?" + urlencode({"since_s": parse_since(since)
                                        .total_seconds()})), as_json)  # fmt: skip
        return

    query = {"since_s": parse_since(since).total_seconds(), "limit": 0 if plot is not None else limit}
    if partition:
        query["partition"] = partition  # type: ignore[assignment]
    answer = service_client(ctx).call("GET", "/v1/history?" + urlencode(query))
    samples = [Sample.from_json(s) for s in answer["samples"]]
    shown = samples[-limit:] if limit else samples
    if plot is not None:
        from hpcserve.cli.history_plot import plot_history

        split = [(datetime.fromisoformat(at), train, infer) for at, train, infer in answer["split"]]
        plot_history(plot, samples, split, answer["roles"])
    if as_json:
        from hpcserve.cli.output import emit_json

        emit_json(answer["samples"][-len(shown) :] if shown else [])
    else:
        _print(shown, int(answer["total"]))
    if plot is not None and not as_json:
        click.echo(f"wrote {plot}")


def _print(samples: list[Sample], total: int) -> None:
    from hpcserve.cli.output import emit_table

    rows = [(s.at.isoformat(timespec="seconds"), s.partition, s.pending_jobs, s.pending_gpus, s.running_gpus,
             s.idle_gpus, s.total_gpus) for s in samples]  # fmt: skip
    title = f"{len(samples)} samples" + (
        f" (newest of {total}; --limit 0 shows all)" if total > len(samples) else ""
    )
    emit_table(title, COLUMNS, rows)


LOST_COLUMNS = ("AT", "JOB", "USER", "NODE", "GPUS", "LOST GPU-H", "FOR DEPLOYMENT", "REPLICA JOB")


def _lost(answer: dict[str, Any], as_json: bool) -> None:
    from hpcserve.cli.output import emit_json, emit_table

    if as_json:
        emit_json(answer)
        return
    rows = [(e["at"][:19], e["job_id"], e["user"], e["node"], e["gpus"], f"{e['lost_gpu_h']:.3f}",
             e["deployment"], e["replica_job_id"]) for e in answer["evictions"]]  # fmt: skip
    title = f"{len(rows)} evictions, {answer['lost_gpu_h']:.3f} GPU-h lost"
    emit_table(title, LOST_COLUMNS, rows)
