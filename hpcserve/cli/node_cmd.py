"""``hpcserve drain-node NODE``: take a node down for maintenance without dropping a request (admins).

The service drains the node in Slurm (running jobs go on, nothing new starts there) and hands each replica
on it over, as before a time limit: a successor starts on another node, the old replica gets no new
requests, and its job is cancelled once the requests it holds have finished. Training jobs on the node
run on to their end. Bring the node back with ``scontrol update nodename=NODE state=resume``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from hpcserve.cli.main import Context

JSON_HELP = "Print machine-readable JSON instead of text."


@click.command("drain-node")
@click.argument("node")
@click.option("--reason", default="maintenance", show_default=True, help="Slurm's reason for the drain.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.pass_obj
def drain_node(ctx: Context, /, node: str, reason: str, as_json: bool) -> None:
    """Drain NODE for maintenance; the service moves its replicas off it first (admins)."""
    from hpcserve.service.client import ServiceClient

    answer = ServiceClient.for_site(ctx.load_site()).call(
        "POST", "/v1/admin/drain", {"node": node, "reason": reason}
    )
    if as_json:
        from hpcserve.cli.output import emit_json

        emit_json(answer)
        return
    click.echo(f"{answer['node']}: drained ({answer['reason']})")
    moving = answer["moving"]
    if not moving:
        click.echo("no replica runs there")
    for r in moving:
        click.echo(f"moving {r['deployment']}/{r['replica']} (job {r['job_id']}): it drains once its "
                   "successor elsewhere is ready")  # fmt: skip
    click.echo(f"when done: scontrol update nodename={answer['node']} state=resume", err=True)
