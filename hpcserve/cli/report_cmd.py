"""``hpcserve report``: one self-contained HTML page of where the GPUs went (utilisation per partition and
the lending split, queue depth and TTFT, the top idle jobs, usage and cost). The data comes from the
service's API (``GET /v1/report-data``: the caller's own, everyone's for an admin); the page is drawn here."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import click

from hpcserve.report import DEFAULT_POINTS, MAX_POINTS  # the package's constants: --help stays light

if TYPE_CHECKING:
    from hpcserve.cli.main import Context


@click.command()
@click.option("--since", default="7d", show_default=True, help="How far back: 90m, 24h, 7d, 2w.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("report.html"),
              show_default=True, help="Where to write the page.")  # fmt: skip
@click.option("--points", type=click.IntRange(1, MAX_POINTS), default=DEFAULT_POINTS, show_default=True,
              help="About how many points each chart line has (each the mean over its stretch).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the report's data as JSON instead of a page.")
@click.pass_obj
def report(ctx: Context, since: str, output: Path, points: int, as_json: bool) -> None:
    """Write an HTML report (charts and tables, no network needed to view it) of the last --since."""
    from hpcserve.cli.history_cmd import parse_since
    from hpcserve.cli.serve_cmds import service_client

    if not as_json:
        check_writable(output)
    query = urlencode({"since_s": parse_since(since).total_seconds(), "points": points})
    answer = service_client(ctx).call("GET", "/v1/report-data?" + query)
    if as_json:
        from hpcserve.cli.output import emit_json

        emit_json(answer)
        return
    from hpcserve.report.data import from_json
    from hpcserve.report.render import render

    write_page(output, render(from_json(answer)))
    click.echo(f"wrote {output}")


def check_writable(path: Path) -> None:
    """Fail before asking the service when the page could not be written anyway."""
    import os

    from hpcserve.errors import HpcserveError

    folder = path.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise HpcserveError(f"cannot write {path}: {folder} is not a folder you may write to "
                            "(fix: pick a writable path with -o)")  # fmt: skip


def write_page(path: Path, text: str) -> None:
    from hpcserve.errors import HpcserveError

    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise HpcserveError(
            f"cannot write {path}: {exc.strerror} (fix: pick a writable path with -o)"
        ) from exc
