"""The comparison as table rows (plain strings), for the CLI's rich table and the benchmark's text."""

from __future__ import annotations

from collections.abc import Sequence

from hpcserve.replay.metrics import PolicyResult

LABELS = {
    "oracle": "oracle (best node-moving split)",
    "predictive": "moves-predictive",
    "static": "static (context)",
}


def label(policy: str) -> str:
    """The name a table shows for a policy (the oracle is only the best node-moving split, not a bound)."""
    return LABELS.get(policy, policy)


COLUMNS = (
    "POLICY", "QUEUE MEAN", "QUEUE P95", "JCT MEAN", "GPU UTIL", "SLO MET", "P99 WAIT",
    "MOVES/DAY", "PREEMPT", "LOST GPU-H", "INF NODES", "WALL",
)  # fmt: skip


def duration(seconds: float) -> str:
    """3725.0 -> 1h02m; 95 -> 1m35s; 7.5 -> 7.5s."""
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds % 1 else f"{seconds:.0f}s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m{int(seconds % 60):02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def row(result: PolicyResult) -> tuple[str, ...]:
    r = result
    return (
        label(r.policy), duration(r.queue_mean_s), duration(r.queue_p95_s), duration(r.jct_mean_s),
        f"{r.gpu_util:.1%}", f"{r.slo_attainment:.2%}", duration(r.p99_wait_s), f"{r.moves_per_day:.1f}",
        f"{r.preemptions:.0f}", f"{r.lost_gpu_h:.0f}", f"{r.mean_inference_nodes:.1f}", f"{r.wall_s:.0f}s",
    )  # fmt: skip


def rows(results: Sequence[PolicyResult]) -> list[tuple[str, ...]]:
    return [row(result) for result in results]


def text_table(results: Sequence[PolicyResult]) -> str:
    """A plain aligned table (for scripts and logs)."""
    cells = [COLUMNS, *rows(results)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        for line in cells
    )
