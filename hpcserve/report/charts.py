"""The report's charts: matplotlib (the ``plot`` extra, Agg backend) drawn to SVG text for inlining.

Text stays text (``svg.fonttype: none``): the page is smaller, its words can be searched, and no glyph ids
repeat across the charts of one page. Each function takes the report's records and returns one ``<svg>``
element, or None when there is nothing to draw (the page then says so in words).
"""

from __future__ import annotations

import importlib
import io
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from hpcserve.errors import HpcserveError

if TYPE_CHECKING:
    from hpcserve.report.data import (
        BusySeries,
        DeploymentSeries,
        PartitionSeries,
        ReportData,
        SplitPoint,
        UsageTable,
    )

# Colour-blind-safe (Okabe-Ito), in order; a role keeps its colour across charts.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
ROLE_COLOURS = {"training": "#0072B2", "inference": "#E69F00", "shared": "#7f7f7f"}
STYLE = {
    "svg.fonttype": "none", "font.family": "sans-serif", "font.size": 10,
    "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica"],
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.color": "#e4e4e4",
    "grid.linewidth": 0.8, "axes.edgecolor": "#888888", "axes.titlesize": 11, "axes.titleweight": "bold",
    "axes.titlelocation": "left", "legend.frameon": False, "legend.fontsize": 9,
    "xtick.color": "#444444", "ytick.color": "#444444", "axes.axisbelow": True,
    "svg.hashsalt": "hpcserve-report",
}  # fmt: skip
WIDTH_IN = 11.0
_PROLOG = re.compile(r"\A.*?(?=<svg)", re.DOTALL)
_SIZE = re.compile(r'(<svg[^>]*?)\s(?:width|height)="[^"]*"')
_MAX_BARS = 12


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise HpcserveError("hpcserve report needs matplotlib (fix: pip install 'hpcserve[plot]')") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def _figure(rows: int, height_in: float, ratios: Sequence[float] | None = None) -> Iterator[Any]:
    plt = _pyplot()
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, 1, sharex=True, figsize=(WIDTH_IN, height_in), squeeze=False,
                                 height_ratios=ratios, layout="constrained")  # fmt: skip
        try:
            yield fig, [a[0] for a in axes]
        finally:
            plt.close(fig)


def to_svg(fig: Any) -> str:
    """The figure as one ``<svg>`` element that scales to its container (viewBox kept, size dropped)."""
    out = io.StringIO()
    fig.savefig(out, format="svg", metadata={"Date": None, "Creator": None})
    svg = _PROLOG.sub("", out.getvalue(), count=1)
    for _ in range(2):
        svg = _SIZE.sub(r"\1", svg, count=1)
    return svg.replace("<svg ", '<svg class="chart" role="img" ', 1).strip()


def _time_axis(axes: Any, since: datetime, until: datetime) -> None:
    mdates: Any = importlib.import_module("matplotlib.dates")
    locator = mdates.AutoDateLocator(minticks=4, maxticks=10)
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    axes.set_xlim(since, until)


def _gapped(times: Sequence[datetime], values: Sequence[float | None], bucket_s: float) -> tuple[
        list[datetime], list[float]]:  # fmt: skip
    """The points with a NaN wherever samples stop for more than two buckets, so a line breaks there
    instead of bridging the silence."""
    xs: list[datetime] = []
    ys: list[float] = []
    gap = timedelta(seconds=2 * bucket_s)
    for i, (at, value) in enumerate(zip(times, values, strict=True)):
        if i and at - times[i - 1] > gap:
            xs.append(times[i - 1] + timedelta(seconds=bucket_s))
            ys.append(math.nan)
        xs.append(at)
        ys.append(math.nan if value is None else value)
    return xs, ys


def _colour(index: int, role: str | None = None) -> str:
    return ROLE_COLOURS.get(role or "", PALETTE[index % len(PALETTE)])


# ----------------------------------------------------------------------------------------- the charts


def utilisation_chart(report: ReportData) -> str | None:
    """Top: allocated GPUs as a share of each partition's GPUs. Middle (with GPU telemetry): how busy the
    jobs' GPUs were, per kind. Bottom: nodes per side (the lending split), a step that holds its last
    value to the end of the period."""
    drawn = [p for p in report.partitions if p.points]
    if not drawn:
        return None
    ratios = (2.2, 1.6, 1) if report.busy else (2.2, 1)
    with _figure(len(ratios), 2.4 * sum(ratios), ratios) as (fig, axes):
        util, sides = axes[0], axes[-1]
        if report.busy:
            _busy_lines(axes[1], report.busy, report.bucket_s)
        for i, series in enumerate(drawn):
            _utilisation_line(util, series, i, report.bucket_s)
        util.set_ylim(0, 105)
        util.set_ylabel("GPUs allocated (%)")
        util.set_title("Allocated GPUs per partition")
        _legend(util, len(drawn))
        _split_steps(sides, report.split, report.until, report.roles)
        _time_axis(sides, report.since, report.until)
        return to_svg(fig)


def _utilisation_line(axes: Any, series: PartitionSeries, index: int, bucket_s: float) -> None:
    times = [p.at for p in series.points]
    pct = [100.0 * p.running_gpus / p.total_gpus if p.total_gpus else None for p in series.points]
    xs, ys = _gapped(times, pct, bucket_s)
    colour = _colour(index, series.role)
    mean = series.allocated_pct()
    label = series.name + (f" (mean {mean:.0f}%)" if mean is not None else "")
    axes.plot(xs, ys, color=colour, linewidth=1.6, label=label)


def _busy_lines(axes: Any, busy: Sequence[BusySeries], bucket_s: float) -> None:
    for i, series in enumerate(busy):
        xs, ys = _gapped([p.at for p in series.points], [p.util_pct for p in series.points], bucket_s)
        axes.plot(xs, ys, color=_colour(i, series.kind), linewidth=1.4,
                  label=f"{series.kind} jobs (mean {series.mean_pct:.0f}%)")  # fmt: skip
    axes.set_ylim(0, 105)
    axes.set_ylabel("GPU busy (%)")
    axes.set_title("How busy the allocated GPUs were (the jobs' NVML utilisation)")
    _legend(axes, len(busy))


def _split_steps(axes: Any, split: Sequence[SplitPoint], until: datetime, roles: Mapping[str, str]) -> None:
    from hpcserve.report.data import SplitPoint

    axes.set_title("Lending split: nodes per side", fontsize=10)
    axes.set_ylabel("nodes")
    if not split:
        axes.text(0.5, 0.5, "no split recorded", transform=axes.transAxes, ha="center", color="#777777")
        return
    points = [*split, SplitPoint(until, split[-1].training_nodes, split[-1].inference_nodes)]
    times = [p.at for p in points]
    train = [p.training_nodes for p in points]
    infer = [p.inference_nodes for p in points]
    axes.stackplot(times, train, infer, step="post", alpha=0.75,
                   colors=(ROLE_COLOURS["training"], ROLE_COLOURS["inference"]),
                   labels=(f"training ({roles.get('training', '?')})",
                           f"inference ({roles.get('inference', '?')})"))  # fmt: skip
    axes.set_ylim(0, max(t + i for t, i in zip(train, infer, strict=True)) or 1)
    _whole_numbers(axes)
    _legend(axes, 2)


def queue_chart(report: ReportData) -> str | None:
    """Top: GPUs asked for by pending jobs, per partition. Bottom (when any deployment has samples):
    requests waiting per deployment, the engines' queues plus the gateway's buffer."""
    partitions = [p for p in report.partitions if p.points]
    deployments = [d for d in report.deployments if any(x.waiting is not None for x in d.points)]
    if not partitions and not deployments:
        return None
    rows = int(bool(partitions)) + int(bool(deployments))
    with _figure(rows, 2.6 * rows + 0.4) as (fig, axes):
        panel = iter(axes)
        if partitions:
            slurm = next(panel)
            for i, series in enumerate(partitions):
                xs, ys = _gapped([p.at for p in series.points], [p.pending_gpus for p in series.points],
                                 report.bucket_s)  # fmt: skip
                slurm.plot(xs, ys, color=_colour(i, series.role), linewidth=1.6, label=series.name)
            _finish(slurm, "Queue depth: GPUs asked for by pending jobs", "pending GPUs")
        if deployments:
            serving = next(panel)
            for i, dep in enumerate(deployments):
                xs, ys = _gapped([p.at for p in dep.points], [p.waiting for p in dep.points], report.bucket_s)
                serving.plot(xs, ys, color=_colour(i), linewidth=1.6, label=dep.name)
            _finish(serving, "Requests waiting per deployment (engines + gateway)", "requests")
        _time_axis(axes[-1], report.since, report.until)
        return to_svg(fig)


def _finish(axes: Any, title: str, ylabel: str, whole: bool = True) -> None:
    axes.set_title(title)
    axes.set_ylabel(ylabel)
    axes.set_ylim(bottom=0)
    if whole:
        _whole_numbers(axes)
    _legend(axes, len(axes.get_lines()))


def _legend(axes: Any, entries: int) -> None:
    """The legend above the plot, right-aligned on the title's line, so it never hides a line."""
    axes.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=max(1, min(entries, 4)),
                borderaxespad=0.2)  # fmt: skip


def _whole_numbers(axes: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.yaxis.set_major_locator(MaxNLocator(integer=True))


def ttft_chart(report: ReportData) -> str | None:
    """Time to first token per deployment: p50 solid, p95 dashed, in seconds."""
    deployments = [d for d in report.deployments if any(x.ttft_p50_s is not None for x in d.points)]
    if not deployments:
        return None
    with _figure(1, 3.2) as (fig, (axes,)):
        for i, dep in enumerate(deployments):
            _ttft_lines(axes, dep, _colour(i), report.bucket_s)
        _finish(axes, "Time to first token (TTFT) per deployment", "seconds", whole=False)
        _time_axis(axes, report.since, report.until)
        return to_svg(fig)


def _ttft_lines(axes: Any, dep: DeploymentSeries, colour: str, bucket_s: float) -> None:
    times = [p.at for p in dep.points]
    xs, p50 = _gapped(times, [p.ttft_p50_s for p in dep.points], bucket_s)
    axes.plot(xs, p50, color=colour, linewidth=1.6, label=f"{dep.name} p50")
    xs, p95 = _gapped(times, [p.ttft_p95_s for p in dep.points], bucket_s)
    axes.plot(xs, p95, color=colour, linewidth=1.2, linestyle="--", label=f"{dep.name} p95")


def usage_chart(table: UsageTable) -> str | None:
    """Cost per account (the top ``_MAX_BARS``), as horizontal bars, biggest on top."""
    rows = sorted(table.rows, key=lambda r: r.cost, reverse=True)[:_MAX_BARS]
    if not rows or all(r.cost <= 0 and r.gpu_hours <= 0 for r in rows):
        return None
    plt = _pyplot()
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(figsize=(WIDTH_IN, 0.45 * len(rows) + 1.1), layout="constrained")
        try:
            keys = [r.key for r in reversed(rows)]
            costs = [r.cost for r in reversed(rows)]
            bars = axes.barh(keys, costs, color=PALETTE[0], alpha=0.85)
            axes.bar_label(bars, labels=[f"{c:,.2f} {table.currency}" for c in costs], padding=4, fontsize=9)
            axes.set_title(f"Cost per {table.by} ({table.currency})")
            axes.grid(axis="y", visible=False)
            axes.set_xlim(0, max(costs) * 1.2 or 1)
            return to_svg(fig)
        finally:
            plt.close(fig)


def all_charts(report: ReportData) -> dict[str, str]:
    """Every chart that has data, by name (``utilisation``, ``queue``, ``ttft``, ``usage``)."""
    charts = {"utilisation": utilisation_chart(report), "queue": queue_chart(report),
              "ttft": ttft_chart(report),
              "usage": usage_chart(report.usage) if report.usage is not None else None}  # fmt: skip
    return {name: svg for name, svg in charts.items() if svg is not None}
