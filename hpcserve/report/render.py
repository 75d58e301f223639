"""The report's HTML from its data: the charts (matplotlib) drawn, then the page (pure) around them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpcserve.report.charts import all_charts
from hpcserve.report.html import page

if TYPE_CHECKING:
    from hpcserve.report.data import ReportData


def render(report: ReportData) -> str:
    """The whole self-contained page."""
    return page(report, all_charts(report))
