"""Who runs a job, for the API's checks, without a Slurm read per request.

``POST /v1/telemetry`` from a training job must come from the job's Slurm owner while the job runs. With
hundreds of jobs reporting every 15 s, a filtered squeue per report would be tens of RPCs a second against
issue 12's one read per tick. ``JobOwners.running(slurm, job_id)`` answers instead from, in order:
- what it verified in the last ``ttl_s`` (a job keeps its owner; it is re-checked once the entry is older,
  so a job that ended stops being believed within ``ttl_s``);
- the service's shared view of Slurm (``hpcserve.slurm.shared_view``: the tick's one unfiltered squeue),
  when the API is given one and that read is at most ``view_age_s`` old: never an RPC of its own (a standby
  service, whose controller does not tick, has no recent read and goes on to the next step);
- one filtered squeue (``--jobs=ID --states=RUNNING``), only for a job the view does not show yet (it
  started after the view's read), and at most once per ``miss_s`` for a job id that is not running (so a
  caller cannot turn reports for made-up job ids into RPCs).
Thread-safe (the API runs handlers in threads); at most ``max_entries`` jobs are remembered.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hpcserve.model.cluster import Job, JobState

TTL_S = 300.0
VIEW_AGE_S = 60.0
MISS_S = 10.0
MAX_ENTRIES = 20_000


@dataclass(frozen=True, slots=True)
class _Seen:
    job: Job | None  # None: not running when checked
    at: float


class JobOwners:
    def __init__(
        self,
        ttl_s: float = TTL_S,
        miss_s: float = MISS_S,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s, self.miss_s, self.max_entries, self._clock = ttl_s, miss_s, max_entries, clock
        self._seen: OrderedDict[str, _Seen] = OrderedDict()
        self._lock = threading.Lock()
        self.filtered_reads = 0  # squeue --jobs calls made (tests and the figures count them)

    def running(self, slurm: Any, job_id: str) -> Job | None:
        """The running job ``job_id`` (with its Slurm user), or None when it is not running."""
        now = self._clock()
        seen = self._recall(job_id, now)
        if seen is not None:
            return seen.job
        job = running_in_view(slurm, job_id, VIEW_AGE_S)
        if job is None:
            job = self._read_one(slurm, job_id)
        self._remember(job_id, _Seen(job, now))
        return job

    def _recall(self, job_id: str, now: float) -> _Seen | None:
        with self._lock:
            seen = self._seen.get(job_id)
            if seen is None:
                return None
            fresh = now - seen.at < (self.ttl_s if seen.job is not None else self.miss_s)
            if not fresh:
                del self._seen[job_id]
                return None
            self._seen.move_to_end(job_id)
            return seen

    def _remember(self, job_id: str, seen: _Seen) -> None:
        with self._lock:
            self._seen[job_id] = seen
            self._seen.move_to_end(job_id)
            while len(self._seen) > self.max_entries:
                self._seen.popitem(last=False)

    def _read_one(self, slurm: Any, job_id: str) -> Job | None:
        from hpcserve.slurm.protocol import JobFilter

        with self._lock:
            self.filtered_reads += 1
        found = slurm.jobs(JobFilter(job_ids=(job_id,), states=("RUNNING",)))
        return next((j for j in found if _is(j, job_id) and j.state is JobState.RUNNING), None)


def running_in_view(slurm: Any, job_id: str, max_age_s: float) -> Job | None:
    """The running job from the shared view's last unfiltered read (None without a recent one, or not
    running in it); never a read of its own."""
    peek = getattr(slurm, "peek_jobs", None)
    jobs = peek(max_age_s) if callable(peek) else None
    return next((j for j in jobs or () if _is(j, job_id) and j.state is JobState.RUNNING), None)


def _is(job: Job, job_id: str) -> bool:
    return job.id == job_id or str(job.job_id) == job_id
