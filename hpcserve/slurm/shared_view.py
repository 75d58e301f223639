"""One Slurm read per tick, shared by every part of the service.

Without it the serving controller ran an unfiltered ``squeue`` every tick, the sampler ``squeue`` and
``sinfo`` every 30 s, and the rebalancer a four-call snapshot every minute, each on its own. ``SharedView``
wraps the service's one Slurm client:
- ``jobs()`` and ``nodes()`` come from one ``squeue`` and one ``sinfo``, each read at most once per
  ``max_age_s`` (the controller's tick), and only when someone asks, then handed, frozen, to whoever asks
  within that age: the controller (jobs), the sampler (both), the planner's snapshot and the replica
  submitter (both, with the cached partitions and topology);
- the age adapts to the queue: a read that took ``d`` seconds is reused for at least ``ADAPT * d``, so on a
  slow slurmctld (a huge queue) hpcserve spends at most about 1/``ADAPT`` of its time in these RPCs;
- and to what is moving: while the controller reports its deployments calm (``settle(True)``: every
  replica ready and answering, nothing done last tick), reads are reused for up to ``calm_s``: by the
  controller (``calm_jobs``, ``calm_nodes``), by the sampler for up to its period as well (``timed_read``:
  samples carry the time of the read, so none is dated inside an outage) and by the rebalancer for up to
  a third of its period (``calm_reader``: the planner plans on minutes of history, the executor looks for
  orphaned drains there and re-checks a node's jobs live before it signals them). A replica that stops
  answering, a pending one, any action or any write ends the calm at once (``settle(False)``). The
  replicas' health is checked over HTTP every tick either way. The replica submitter always gets a read
  at most one tick old (``jobs()``, ``nodes()``, ``snapshot()``);
- ``partitions()`` (scontrol show partition) is cached for ``partitions_ttl_s``, the topology (scontrol show
  topology, which changes only with slurm.conf) for ``topology_ttl_s``;
- a failed read is remembered: until the backoff ends (doubling from ``max_age_s`` up to ``MAX_BACKOFF_S``),
  every caller gets the same error without another RPC, and the view logs one warning when reads start
  failing and one line when they work again;
- every other call (submit, cancel, drain, pin, release, signal, ...) goes to the client, and drops the cached
  reads: the next reader sees what it changed;
- ``live`` is the client itself, for readers that must see Slurm as it is now (the rebalancer's executor
  re-checks a node's jobs before it signals them: defence in depth, at most once a minute).
Filtered reads (``jobs(filt)``: one user's jobs for the API) go to Slurm directly; ``peek_jobs`` hands the
API the last read without making one. Thread-safe: the
scheduler runs the service's jobs in threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hpcserve.errors import SlurmCommandError
from hpcserve.model.cluster import ClusterSnapshot, Job, Node, Partition, Topology, with_switches
from hpcserve.slurm.protocol import JobFilter, Ping

log = logging.getLogger("hpcserve.slurm")

ADAPT = 10.0  # reuse a read for at least ADAPT x the time it took
MAX_BACKOFF_S = 60.0


def saw_change(reader: object) -> None:
    """A write that did not go through ``reader`` (submitted as a replica's owner, or by the rebalancer's
    executor on its own client): a shared view reads again next time; any other reader is left alone."""
    invalidate = getattr(reader, "invalidate", None)
    if callable(invalidate):
        invalidate()


@dataclass(frozen=True, slots=True)
class _Read:
    value: tuple[Any, ...]
    at: float  # monotonic time the read ended
    took_s: float


class SharedView:
    """A read-through, per-tick cache over a Slurm client (see the module docstring)."""

    def __init__(
        self,
        client: Any,
        max_age_s: float,
        *,
        partitions_ttl_s: float = 60.0,
        topology_ttl_s: float = 3600.0,
        calm_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.live = client
        self.max_age_s, self.partitions_ttl_s, self.topology_ttl_s = (
            max_age_s,
            partitions_ttl_s,
            topology_ttl_s,
        )
        self.calm_s = calm_s
        self.calm = False  # settle(): the controller saw nothing move
        self._clock = clock
        self._lock = threading.Lock()
        self._reads: dict[str, _Read] = {}  # "jobs" (squeue), "nodes" (sinfo)
        self._partitions: tuple[float, tuple[Partition, ...]] | None = None
        self._topology: tuple[float, Topology] | None = None
        self._failed: tuple[float, float, SlurmCommandError] | None = None  # (until, backoff, error)
        self.reads = 0  # squeue and sinfo calls made

    # ------------------------------------------------------------------------------------------- reads
    def ping(self) -> Ping:
        return self.live.ping()  # type: ignore[no-any-return]

    def jobs(self, filt: JobFilter | None = None) -> list[Job]:
        if filt is not None:
            return self.live.jobs(filt)  # type: ignore[no-any-return]
        return list(self._fresh("jobs").value)

    def nodes(self) -> list[Node]:
        return list(self._fresh("nodes").value)

    def calm_jobs(self) -> list[Job]:
        """The controller's read: up to ``calm_s`` old while it reports calm."""
        return list(self.read("jobs", self.calm_s))

    def peek_jobs(self, max_age_s: float) -> tuple[Job, ...] | None:
        """The last squeue if it is at most ``max_age_s`` old, else None: never a read of its own (the API
        checks a job's owner here before it asks Slurm for that one job)."""
        with self._lock:
            read = self._reads.get("jobs")
            fresh = read is not None and self._clock() - read.at <= max_age_s
            return read.value if read is not None and fresh else None

    def calm_nodes(self) -> list[Node]:
        return list(self.read("nodes", self.calm_s))

    def read(self, what: str, calm_age_s: float) -> tuple[Any, ...]:
        """``jobs`` (squeue) or ``nodes`` (sinfo), up to ``calm_age_s`` old while calm, else a tick."""
        return self._fresh(what, calm_age_s).value

    def timed_read(self, max_age_s: float) -> tuple[datetime, tuple[Job, ...], tuple[Node, ...]]:
        """The sampler's squeue and sinfo: while calm, up to ``min(calm_s, max_age_s)`` old, with the wall
        time of the older of the two."""
        calm_age = min(self.calm_s, max_age_s)
        jobs, nodes = self._fresh("jobs", calm_age), self._fresh("nodes", calm_age)
        with self._lock:
            age_s = self._clock() - min(jobs.at, nodes.at)
        return datetime.now(UTC) - timedelta(seconds=age_s), jobs.value, nodes.value

    def calm_reader(self, max_age_s: float) -> CalmReader:
        """This view as the rebalancer reads it: while calm, reads up to ``min(calm_s, max_age_s)`` old."""
        return CalmReader(self, min(self.calm_s, max_age_s))

    def partitions(self) -> list[Partition]:
        with self._lock:
            now = self._clock()
            if self._partitions is None or now - self._partitions[0] >= self.partitions_ttl_s:
                self._partitions = (now, tuple(self.live.partitions()))
            return list(self._partitions[1])

    def topology(self) -> Topology:
        with self._lock:
            now = self._clock()
            if self._topology is None or now - self._topology[0] >= self.topology_ttl_s:
                self._topology = (now, self.live.topology())
            return self._topology[1]

    def snapshot(self, calm_age_s: float | None = None) -> ClusterSnapshot:
        jobs = self._fresh("jobs", calm_age_s).value  # first: squeue fails at once when slurmctld is down
        nodes, topology = self._fresh("nodes", calm_age_s).value, self.topology()
        partitions = tuple(self.partitions())
        return ClusterSnapshot(datetime.now(UTC), with_switches(nodes, topology), jobs, partitions, topology)

    def invalidate(self) -> None:
        """Forget the cached reads (after a write, or when the caller knows Slurm changed)."""
        with self._lock:
            self._reads, self._partitions, self.calm = {}, None, False

    def settle(self, calm: bool) -> None:
        """The controller's word after each tick: calm (reads may be ``calm_s`` old) or moving."""
        self.calm = calm

    # ------------------------------------------------------------------------------------------ writes
    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.live, name)
        if not callable(attr):
            return attr

        def passed_through(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            finally:
                self.invalidate()

        return passed_through

    # -------------------------------------------------------------------------------------- internals
    def _fresh(self, what: str, calm_age_s: float | None = None) -> _Read:
        """The cached read while it is young enough: ``calm_age_s`` (when given) while calm, else a
        tick; a slow read lives longer either way."""
        with self._lock:
            now = self._clock()
            read = self._reads.get(what)
            age = calm_age_s if calm_age_s is not None and self.calm else self.max_age_s
            if read is not None and now - read.at < max(age, ADAPT * read.took_s):
                return read
            if self._failed is not None and now < self._failed[0]:
                raise self._failed[2]
            return self._refresh(what, now)

    def _refresh(self, what: str, start: float) -> _Read:
        try:
            value = tuple(self.live.jobs() if what == "jobs" else self.live.nodes())
        except SlurmCommandError as exc:
            backoff = min(self._failed[1] * 2, MAX_BACKOFF_S) if self._failed else max(self.max_age_s, 1.0)
            if self._failed is None:
                log.warning("Slurm reads fail (%s); retrying with backoff up to %.0f s", exc, MAX_BACKOFF_S)
            self._failed = (self._clock() + backoff, backoff, exc)
            raise
        end = self._clock()
        if self._failed is not None:
            log.info("Slurm reads work again")
            self._failed = None
        self.reads += 1
        self._reads[what] = _Read(value, end, end - start)
        return self._reads[what]


class CalmReader:
    """A ``SlurmReader`` over a shared view whose unfiltered reads may be ``calm_age_s`` old while the
    controller reports calm (the rebalancer's); writes seen elsewhere still drop the cache
    (``invalidate``)."""

    def __init__(self, view: SharedView, calm_age_s: float) -> None:
        self._view, self._age = view, calm_age_s

    def ping(self) -> Ping:
        return self._view.ping()

    def jobs(self, filt: JobFilter | None = None) -> list[Job]:
        return self._view.jobs(filt) if filt is not None else list(self._view.read("jobs", self._age))

    def nodes(self) -> list[Node]:
        return list(self._view.read("nodes", self._age))

    def partitions(self) -> list[Partition]:
        return self._view.partitions()

    def topology(self) -> Topology:
        return self._view.topology()

    def snapshot(self) -> ClusterSnapshot:
        return self._view.snapshot(self._age)

    def invalidate(self) -> None:
        self._view.invalidate()
