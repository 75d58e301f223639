"""The queue sampler: one batched Slurm read per tick (one ``squeue``, one ``sinfo``) -> one ``QueueSample``
per partition -> the store.

``queue_samples`` is the pure conversion. ``Sampler.tick`` is the thin edge around it: when slurmctld does
not answer, it logs the start of the gap once ("slurmctld unreachable since ...") and returns; the first
tick that reads Slurm again logs how long the gap lasted, and sampling goes on.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime

from hpcserve.errors import SlurmCommandError
from hpcserve.model.cluster import Job, JobState, Node
from hpcserve.slurm.protocol import SlurmReader
from hpcserve.store import HistoryStore, QueueSample
from hpcserve.store.store import utc_now

log = logging.getLogger("hpcserve.sampler")


def queue_samples(at: datetime, nodes: Sequence[Node], jobs: Iterable[Job]) -> list[QueueSample]:
    """One sample per partition the nodes belong to (sorted by name).

    - pending jobs and GPUs: jobs waiting to start (a job pending in ``train,infer`` counts in both);
    - running GPUs: GPUs held by the partition's running jobs;
    - idle and total GPUs: over the partition's nodes (idle counts only nodes new work may land on).
    """
    members: dict[str, list[Node]] = defaultdict(list)
    for node in nodes:
        for partition in node.partitions:
            members[partition].append(node)
    pending_jobs: dict[str, int] = defaultdict(int)
    pending_gpus: dict[str, int] = defaultdict(int)
    running_gpus: dict[str, int] = defaultdict(int)
    for job in jobs:
        if job.state.is_pending:
            for partition in job.partition.split(","):
                pending_jobs[partition] += 1
                pending_gpus[partition] += job.gpus
        elif job.state is JobState.RUNNING:
            running_gpus[job.partition] += job.gpus
    return [
        QueueSample(
            at=at,
            partition=name,
            pending_jobs=pending_jobs[name],
            pending_gpus=pending_gpus[name],
            running_gpus=running_gpus[name],
            idle_gpus=sum(n.gpus_free for n in part),
            total_gpus=sum(n.gpus_total for n in part),
        )
        for name, part in sorted(members.items())
    ]


TimedRead = Callable[[], tuple[datetime, Sequence[Job], Sequence[Node]]]


class Sampler:
    """Reads Slurm once per ``tick`` and stores the samples. ``down_since`` is set while slurmctld does not
    answer.

    ``timed``, when given, reads for it and dates the read (the service's shared view: a read up to a few
    seconds old while nothing moves, dated when it was made); a read already stored is not stored twice.
    """

    def __init__(
        self, client: SlurmReader, store: HistoryStore, *, clock: Callable[[], datetime] = utc_now,
        timed: TimedRead | None = None,
    ) -> None:  # fmt: skip
        self._client, self._store, self._clock = client, store, clock
        self._timed, self._shared = timed or self._now_read, timed is not None
        self.down_since: datetime | None = None
        self.last_sample: datetime | None = None

    def tick(self) -> int | None:
        """Sample and store; how many rows were stored, or None when Slurm did not answer (a gap)."""
        at = self._clock()
        try:
            read_at, jobs, nodes = self._timed()
        except SlurmCommandError as exc:
            self._gap(at, exc)
            return None
        self._back(at)
        if self.last_sample is not None and read_at <= self.last_sample and self._shared:
            return 0  # the shared view's read this sampler has stored already
        stored = self._store.add_queue_samples(queue_samples(read_at, nodes, jobs))
        self.last_sample = read_at
        return stored

    def _now_read(self) -> tuple[datetime, Sequence[Job], Sequence[Node]]:
        at = self._clock()
        jobs = self._client.jobs()  # first: squeue fails at once when slurmctld is down
        return at, jobs, self._client.nodes()

    def _gap(self, at: datetime, exc: SlurmCommandError) -> None:
        if self.down_since is None:
            self.down_since = at
            log.warning("slurmctld unreachable since %s: no queue samples until it answers (%s)",
                        at.isoformat(timespec="seconds"), exc.reason)  # fmt: skip
        else:
            log.debug("slurmctld still unreachable since %s", self.down_since.isoformat(timespec="seconds"))

    def _back(self, at: datetime) -> None:
        if self.down_since is None:
            return
        since, until = self.down_since.isoformat(timespec="seconds"), at.isoformat(timespec="seconds")
        gap_s = (at - self.down_since).total_seconds()
        log.warning(
            "slurmctld answers again: no queue samples from %s to %s (%.0f s gap)", since, until, gap_s
        )
        self.down_since = None
