"""GPU allocations as Slurm's accounting records them: what ``hpcserve usage`` counts GPU-hours from.

Pure: no I/O imports (import-linter checks ``hpcserve.model``). Built by ``hpcserve.slurm.parsers``
from one ``sacct -X -D`` read; summed by ``hpcserve.usage.compute``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True, slots=True)
class GpuAllocation:
    """One run of one job (``sacct -X -D``: each run of a requeued job is its own record).

    ``gpus``: ``gres/gpu=N`` of AllocTRES (0 for a job that held none, or never started).
    ``gpu_types``: the typed entries (``gres/gpu:h100=2`` -> ("h100", 2)); slurmdbd records them only for
    the types AccountingStorageTRES lists, so they may be empty while ``gpus`` is not.
    ``end``: None while the job runs. ``elapsed_s``: ElapsedRaw, Slurm's own seconds (up to now while it
    runs). ``comment``: empty unless slurmdbd keeps comments (AccountingStoreFlags=job_comment).
    """

    job_id: str
    user: str
    account: str
    partition: str
    state: str
    nodes: tuple[str, ...]
    gpus: int
    gpu_types: tuple[tuple[str, int], ...]
    start: datetime | None
    end: datetime | None
    elapsed_s: int
    name: str = ""
    comment: str = ""

    def seconds_within(self, since: datetime, until: datetime) -> int:
        """The seconds of this run inside ``[since, until)``: all of ElapsedRaw for a run wholly inside,
        only the part inside for one that overlaps an edge, 0 for one that never started."""
        if self.start is None or self.elapsed_s <= 0:
            return 0
        run_end = self.start + timedelta(seconds=self.elapsed_s)
        low, high = max(self.start, since), min(run_end, until)
        return max(0, round((high - low).total_seconds()))
