"""The report page: ``ReportData`` and its charts (inline ``<svg>`` text) -> one self-contained HTML string.

Pure (import-linter's ``decisions-pure`` contract): no I/O, no plotting; every value from the data is
escaped. The page needs no network: its one stylesheet is inline, its fonts the viewer's own sans-serif,
its charts inline SVG. A section without data says so in words, starting "No data".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hpcserve.model.telemetry import IdleFlag
    from hpcserve.report.data import DeploymentSeries, PartitionSeries, ReportData, UsageTable

TOP_IDLE = 15
NONE = "\u2013"  # an en dash: no value
STYLE = """
:root { --ink:#1d2330; --muted:#5b6475; --line:#e3e6ec; --bg:#f6f7f9; --card:#ffffff; --accent:#0072B2;
        --warn:#D55E00; font-family: "DejaVu Sans", "Liberation Sans", Arial, Helvetica, sans-serif; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink); font-size:15px; line-height:1.45; }
main { max-width:1180px; margin:0 auto; padding:28px 32px 40px; }
header { border-bottom:3px solid var(--accent); padding-bottom:14px; margin-bottom:20px; }
h1 { font-size:28px; margin:0 0 4px; letter-spacing:-0.01em; }
h2 { font-size:20px; margin:0 0 4px; }
.period { font-size:18px; margin:0; }
.meta, .lead, footer { color:var(--muted); font-size:13.5px; }
.lead { margin:0 0 12px; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:18px 22px;
          margin:0 0 20px; }
.cards { display:grid; grid-template-columns:repeat(auto-fill, minmax(200px, 1fr)); gap:14px;
         background:none; border:0; padding:0; }
.card { background:var(--card); border:1px solid var(--line); border-left:5px solid var(--accent);
        border-radius:8px; padding:12px 14px; }
.card .label { color:var(--muted); font-size:13px; }
.card .value { font-size:26px; font-weight:bold; margin:2px 0; }
.card .sub { color:var(--muted); font-size:12.5px; }
.card.warn { border-left-color:var(--warn); }
svg.chart { width:100%; height:auto; display:block; margin:6px 0 10px; }
table { border-collapse:collapse; width:100%; font-size:14px; margin-top:6px; }
th, td { padding:6px 10px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
th { background:#eef1f5; font-weight:600; font-size:13px; color:#333a48; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
tbody tr:nth-child(even) { background:#fafbfc; }
.bar { position:relative; min-width:150px; }
.bar span.fill { position:absolute; left:0; top:5px; bottom:5px; background:#f3c7a8; border-radius:3px; }
.bar span.text { position:relative; padding-left:6px; }
.nodata { background:#fff8e6; border:1px solid #f1dca2; border-radius:6px; padding:10px 14px; margin:8px 0; }
footer { margin-top:8px; }
"""


def page(report: ReportData, charts: Mapping[str, str]) -> str:
    """The whole page. ``charts``: ``<svg>`` text by name (``utilisation``, ``queue``, ``ttft``,
    ``usage``); a missing one is replaced by words."""
    title = f"hpcserve report: {_period(report)}"
    body = "\n".join((
        _header(report), _cards(report), _utilisation(report, charts), _queue(report, charts),
        _idle(report), _usage(report, charts), _footer(),
    ))  # fmt: skip
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n{body}\n</main>\n"
        "</body>\n</html>\n"
    )


# ------------------------------------------------------------------------------------------ helpers


def _when(at: datetime) -> str:
    return at.strftime("%d %b %Y %H:%M UTC")


def _span(seconds: float) -> str:
    """86400*7 -> "7 days", 5400 -> "1.5 hours", 600 -> "10 minutes"."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds / size
            text = f"{n:.0f}" if abs(n - round(n)) < 0.05 else f"{n:.1f}"
            return f"{text} {unit}" + ("" if text == "1" else "s")
    return f"{seconds:.0f} seconds"


def _period(report: ReportData) -> str:
    return f"{_when(report.since)} to {_when(report.until)}"


def _num(value: float | None, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return NONE
    return f"{value:,.{digits}f}{unit}"


def _round(value: float) -> str:
    """Whole numbers from 100 on, two decimals under it: 1,250 and 2.37."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return NONE
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _nodata(text: str) -> str:
    return f'<p class="nodata"><strong>No data.</strong> {escape(text[:1].upper() + text[1:])}</p>'


def _table(
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    numeric: Iterable[int] = (),
    raw: Iterable[int] = (),
) -> str:
    """A table; cells are escaped except the columns in ``raw`` (already HTML); ``numeric`` right-aligned."""
    nums, raws = set(numeric), set(raw)

    def cell(tag: str, i: int, text: str) -> str:
        cls = ' class="num"' if i in nums else ""
        return f"<{tag}{cls}>{text if i in raws else escape(text)}</{tag}>"

    head = "".join(cell("th", i, c) for i, c in enumerate(columns))
    body = "\n".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"


def _bar(value: float, top: float, text: str) -> str:
    width = 0.0 if top <= 0 else max(0.0, min(100.0, 100.0 * value / top))
    return (f'<div class="bar"><span class="fill" style="width:{width:.1f}%"></span>'
            f'<span class="text">{escape(text)}</span></div>')  # fmt: skip


def _section(ident: str, heading: str, lead: str, *parts: str) -> str:
    inner = "\n".join(p for p in parts if p)
    return (f'<section id="{ident}">\n<h2>{escape(heading)}</h2>\n<p class="lead">{escape(lead)}</p>\n'
            f"{inner}\n</section>")  # fmt: skip


# ----------------------------------------------------------------------------------------- sections


def _header(report: ReportData) -> str:
    own = f"{report.viewer}'s own deployments, idle jobs and usage; partitions are cluster-wide"
    scope = "admin view: every user's deployments, idle jobs and usage" if report.everyone else own
    days = _span((report.until - report.since).total_seconds())
    return (
        "<header>\n<h1>Where the GPUs went</h1>\n"
        f'<p class="period">{escape(_period(report))} ({escape(days)})</p>\n'
        f'<p class="meta">Generated {escape(_when(report.generated_at))} for {escape(report.viewer)} · '
        f"{escape(scope)} · each point on the charts is the mean over {escape(_span(report.bucket_s))}</p>\n"
        "</header>"
    )


def _card(label: str, value: str, sub: str, warn: bool = False) -> str:
    cls = "card warn" if warn else "card"
    return (f'<div class="{cls}"><div class="label">{escape(label)}</div><div class="value">{escape(value)}'
            f'</div><div class="sub">{escape(sub)}</div></div>')  # fmt: skip


def _cards(report: ReportData) -> str:
    cards = []
    for series in (p for p in report.partitions if p.points):
        pct = series.allocated_pct()
        sub = f"{_num(series.idle_gpu_hours(report.bucket_s), 0)} idle GPU-hours"
        cards.append(
            _card(f"{series.name}: GPUs allocated", _num(pct, 0, "%"), sub, pct is not None and pct < 30)
        )
    for busy in report.busy:
        sub = "mean NVML utilisation of their GPUs"
        cards.append(
            _card(f"{busy.kind} jobs: GPUs busy", _num(busy.mean_pct, 0, "%"), sub, busy.mean_pct < 30)
        )
    if report.lending_mode == "overlap" or report.evictions:
        lost = f"{report.lost_gpu_h:,.1f} GPU-hours of work lost"
        cards.append(_card("Lending: jobs evicted", str(report.evictions), lost, report.evictions > 0))
    else:
        cards.append(_card("Lending: nodes moved", str(max(len(report.split) - 1, 0)), "between the sides"))
    if report.idle_jobs:
        wasted = sum(j.gpu_hours_wasted for j in report.idle_jobs)
        cards.append(
            _card("Idle jobs now", str(len(report.idle_jobs)), f"{wasted:,.1f} GPU-hours wasted", True)
        )
    if report.usage is not None and report.usage.rows:
        total = sum(r.cost for r in report.usage.rows)
        hours = sum(r.gpu_hours for r in report.usage.rows)
        cost = f"{_round(total)} {report.usage.currency}"
        cards.append(_card("Cost", cost, f"{_round(hours)} GPU-hours"))
    if not cards:
        return ""
    return '<section class="cards">\n' + "\n".join(cards) + "\n</section>"


def _utilisation(report: ReportData, charts: Mapping[str, str]) -> str:
    whose = "every job" if report.everyone else f"{report.viewer}'s jobs"
    busy = f"how busy the GPUs of {whose} were (NVML), " if report.busy else ""
    lead = (f"Allocated GPUs as a share of each partition's GPUs, {busy}and how many nodes each side "
            f"(training, inference) held: lending mode {report.lending_mode}.")  # fmt: skip
    drawn = [p for p in report.partitions if p.points]
    if not drawn:
        return _section("utilisation", "GPU utilisation per partition", lead, _nodata(
            f"the service recorded no queue samples from {_period(report)} "
            "(is `hpcserve service` running with its sampler?)."))  # fmt: skip
    rows = [_partition_row(p, report.bucket_s) for p in drawn]
    table = _table(("Partition", "Role", "GPUs", "Allocated (mean)", "Idle GPU-hours", "Peak pending GPUs"),
                   rows, numeric=(2, 3, 4, 5))  # fmt: skip
    none = "" if report.busy else (
        f'<p class="meta">No GPU telemetry from {escape(whose)} in this period: the chart shows GPUs '
        "allocated, not how busy they were.</p>")  # fmt: skip
    return _section(
        "utilisation", "GPU utilisation per partition", lead, charts.get("utilisation", ""), none, table
    )


def _partition_row(series: PartitionSeries, bucket_s: float) -> list[str]:
    gpus = max(p.total_gpus for p in series.points)
    return [series.name, series.role or NONE, _num(gpus, 0), _num(series.allocated_pct(), 0, "%"),
            _num(series.idle_gpu_hours(bucket_s), 1), _num(series.peak_pending_gpus(), 0)]  # fmt: skip


def _queue(report: ReportData, charts: Mapping[str, str]) -> str:
    whose = "every deployment" if report.everyone else f"{report.viewer}'s deployments"
    lead = f"Slurm's queue per partition, and for {whose}: requests waiting and time to first token."
    parts = [charts.get("queue", ""), charts.get("ttft", "")]
    if not report.deployments:
        parts.append(
            _nodata(f"{whose} had no engine samples in this period (no deployment, or none served).")
        )
    else:
        columns = ("Deployment", "Owner", "TTFT p50 (mean)", "TTFT p95 (mean)", "TTFT p95 (worst)",
                   "Waiting (peak)")  # fmt: skip
        parts.append(_table(columns, (_deployment_row(d) for d in report.deployments), numeric=(2, 3, 4, 5)))
    if "queue" not in charts and not any(p.points for p in report.partitions):
        parts.insert(0, _nodata("no queue samples in this period."))
    return _section("queue", "Queue depth and time to first token", lead, *parts)


def _deployment_row(dep: DeploymentSeries) -> list[str]:
    def mean(get: Callable[[int], float | None]) -> float | None:
        values = [v for v in (get(i) for i in range(len(dep.points))) if v is not None]
        return sum(values) / len(values) if values else None

    p95 = [p.ttft_p95_s for p in dep.points if p.ttft_p95_s is not None]
    waiting = [p.waiting for p in dep.points if p.waiting is not None]
    return [dep.name, dep.owner, _seconds(mean(lambda i: dep.points[i].ttft_p50_s)),
            _seconds(mean(lambda i: dep.points[i].ttft_p95_s)), _seconds(max(p95) if p95 else None),
            _num(max(waiting) if waiting else None, 0)]  # fmt: skip


def _idle(report: ReportData) -> str:
    whose = "every user's jobs" if report.everyone else f"{report.viewer}'s jobs"
    lead = f"Jobs flagged idle now ({whose}), by GPU-hours wasted. {report.idle_note}".strip()
    if report.idle_jobs is None:
        return _section("idle", "Top idle jobs", "Jobs whose GPUs sit idle, by GPU-hours wasted.",
                        _nodata(report.idle_note))  # fmt: skip
    if not report.idle_jobs:
        return _section("idle", "Top idle jobs", lead, _nodata(f"none of {whose} is flagged idle now."))
    jobs = sorted(report.idle_jobs, key=lambda j: j.gpu_hours_wasted, reverse=True)[:TOP_IDLE]
    top = jobs[0].gpu_hours_wasted
    rows = [_idle_row(j, top) for j in jobs]
    table = _table(("Job", "User", "Kind", "GPUs", "Idle since", "GPU use", "GPU-hours wasted", "Why"),
                   rows, numeric=(3, 5), raw=(6,))  # fmt: skip
    more = len(report.idle_jobs) - len(jobs)
    note = f'<p class="meta">and {more} more (hpcserve idle lists them all)</p>' if more > 0 else ""
    return _section("idle", "Top idle jobs", lead, table, note)


def _idle_row(job: IdleFlag, top: float) -> list[str]:
    return [job.job_id, job.user, job.kind, str(job.gpus), _when(job.since), _num(job.mean_util_pct, 0, "%"),
            _bar(job.gpu_hours_wasted, top, f"{job.gpu_hours_wasted:,.1f}"), job.reason]  # fmt: skip


def _usage(report: ReportData, charts: Mapping[str, str]) -> str:
    whose = "every account" if report.everyone else f"{report.viewer}'s jobs"
    if report.usage is None:
        return _section("usage", "Usage and cost per account", f"GPU-hours and their cost, for {whose}.",
                        _nodata(report.usage_note))  # fmt: skip
    table = report.usage
    lead = f"GPU-hours and their cost per {table.by}, for {whose}. {report.usage_note}".strip()
    if not table.rows:
        return _section(
            "usage", f"Usage and cost per {table.by}", lead, _nodata(f"no GPU-hours for {whose}.")
        )
    return _section("usage", f"Usage and cost per {table.by}", lead, charts.get("usage", ""),
                    _usage_table(table))  # fmt: skip


def _usage_table(table: UsageTable) -> str:
    rows = sorted(table.rows, key=lambda r: r.cost, reverse=True)
    top = rows[0].cost
    body = [[r.key, _num(r.gpu_hours, 1), _num(r.busy_gpu_hours, 1), _num(r.idle_gpu_hours, 1),
             NONE if r.tokens is None else f"{r.tokens:,}",
             _bar(r.cost, top, f"{r.cost:,.2f} {table.currency}")] for r in rows]  # fmt: skip
    columns = (table.by.capitalize(), "GPU-hours", "Busy GPU-h", "Idle GPU-h", "Tokens", "Cost")
    return _table(columns, body, numeric=(1, 2, 3, 4), raw=(5,))


def _footer() -> str:
    return (
        "<footer>Made by <code>hpcserve report</code> from the hpcserve service's API. Allocated GPUs come "
        "from Slurm's queue samples; TTFT from the engines' metrics; idle flags from the jobs' NVML "
        "telemetry. "
        "This page is self-contained: it needs no network to view.</footer>"
    )
