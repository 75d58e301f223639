"""``hpcserve idle [--json]``: the jobs the service flags idle (policy ``idle``) and the GPU-hours they
wasted; for admins (anyone else exits 77). Through the service's ``GET /v1/idle``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from hpcserve.cli.main import JSON_HELP

if TYPE_CHECKING:
    from hpcserve.cli.main import Context


@click.command(short_help="Jobs holding GPUs they do not use (admins).")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_obj
def idle(ctx: Context, /, as_json: bool) -> None:
    """Running jobs whose GPUs averaged under the policy's threshold for its window, and replicas that
    served no request for that long, most GPU-hours wasted first. GPU-hours wasted = the job's GPUs x the
    time since its idle stretch began. Replica jobs of warm deployments (engines asleep by design) are
    listed apart, not as idle. For admins; users see their own in `hpcserve ps`."""
    from hpcserve.service.client import ServiceClient

    found: dict[str, Any] = ServiceClient.for_site(ctx.load_site()).call("GET", "/v1/idle")
    if as_json:
        from hpcserve.cli.output import emit_json

        emit_json(found)
        return
    from hpcserve.cli.output import emit_table

    flags = found["flags"]
    rows = [(f["job_id"], f["user"], f["kind"], f["gpus"], _pct(f["mean_util_pct"]), f["since"][:19],
             f"{f['gpu_hours_wasted']:.2f}", f["reason"]) for f in flags]  # fmt: skip
    title = f"{len(flags)} idle jobs, {found['gpu_hours_wasted']:.2f} GPU-hours wasted"
    emit_table(
        title, ("JOBID", "USER", "KIND", "GPUS", "GPU%", "SINCE (UTC)", "GPU-H WASTED", "REASON"), rows
    )
    warm = found.get("warm") or []
    if warm:  # kept on purpose: their engines sleep, a request wakes them in seconds
        emit_table(f"{len(warm)} warm replica jobs (engines asleep by design: not idle)",
                   ("JOBID", "USER", "DEPLOYMENT", "GPUS"),
                   [(w["job_id"], w["user"], w["deployment"], w["gpus"]) for w in warm])  # fmt: skip


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}%"
