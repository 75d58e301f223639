"""Formatting for the CLI: JSON for machines, rich tables for people (rich is imported only here, lazily)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


def emit_json(data: Any) -> None:
    import msgspec

    sys.stdout.buffer.write(msgspec.json.encode(data) + b"\n")


def emit_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    # markup and emoji off: Slurm text such as "hpcserve:train:demo" must print as it is
    console = Console(markup=False, emoji=False, highlight=False, width=None if sys.stdout.isatty() else 200)
    table = Table(title=title, header_style="bold", title_justify="left")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*("-" if v is None or v == "" else str(v) for v in row))
    console.print(table)


def human_seconds(seconds: float | None) -> str:
    """83 -> 1m23s, 7300 -> 2h01m, 200000 -> 2d07h."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
