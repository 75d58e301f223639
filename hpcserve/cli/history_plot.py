"""The PNG of ``hpcserve history --plot``: matplotlib (the ``plot`` extra) with the Agg backend, imported only
when a plot is asked for."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from hpcserve.errors import HpcserveError


class QueueSample(Protocol):
    """What the plot reads of a queue sample (``hpcserve.store.QueueSample``, or the CLI's copy of the
    API's JSON)."""

    @property
    def at(self) -> datetime: ...

    @property
    def partition(self) -> str: ...

    @property
    def pending_gpus(self) -> int: ...


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise HpcserveError("--plot needs matplotlib (fix: pip install 'hpcserve[plot]')") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(
    path: Path,
    samples: Sequence[QueueSample],
    split: Sequence[tuple[datetime, int, int]],
    roles: Mapping[str, str],
) -> None:
    """Top: pending GPUs (queue depth) per partition. Bottom: nodes per side, a step line that holds its
    last value until the newest sample."""
    plt = _pyplot()
    fig, (queue, sides) = plt.subplots(2, 1, sharex=True, figsize=(10, 6), height_ratios=(2, 1))
    by_partition: dict[str, list[QueueSample]] = defaultdict(list)
    for sample in samples:
        by_partition[sample.partition].append(sample)
    for name, rows in sorted(by_partition.items()):
        queue.plot([r.at for r in rows], [r.pending_gpus for r in rows], label=f"{name} pending GPUs")
    queue.set_ylabel("pending GPUs")
    queue.set_title("hpcserve: queue depth per partition and the training/inference split")
    if by_partition:
        queue.legend(loc="upper left")
    _plot_split(sides, split, samples, roles)
    fig.autofmt_xdate()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise HpcserveError(f"cannot write {path}: {exc.strerror} (fix: pick a writable path)") from exc
    finally:
        plt.close(fig)


def _plot_split(
    axes: Any,
    split: Sequence[tuple[datetime, int, int]],
    samples: Sequence[QueueSample],
    roles: Mapping[str, str],
) -> None:
    points = list(split)
    if points and samples and samples[-1].at > points[-1][0]:
        points.append((samples[-1].at, points[-1][1], points[-1][2]))
    times = [p[0] for p in points]
    axes.step(
        times, [p[1] for p in points], where="post", label=f"training ({roles.get('training', '?')}) nodes"
    )
    axes.step(
        times, [p[2] for p in points], where="post", label=f"inference ({roles.get('inference', '?')}) nodes"
    )
    axes.set_ylabel("nodes")
    axes.set_ylim(bottom=0)
    axes.legend(loc="upper left")
