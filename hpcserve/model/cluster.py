"""Typed snapshot of a Slurm cluster, shared by every backend and every decision function.

Pure: no I/O imports (import-linter checks it). ``hpcserve.slurm.models`` re-exports these names.

Frozen dataclasses with slots, and a frozen msgspec Struct for ``Job`` (``hpcserve ps`` builds 10,000 per
call); not pydantic, which the CLI would pay for at start. Times are timezone-aware UTC datetimes;
durations are seconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

import msgspec

TAG_PREFIX = "hpcserve:"

# Node state flags that make a node unusable for new work (Slurm's names, as in sinfo --json).
UNAVAILABLE_FLAGS = frozenset(
    {"DRAIN", "NOT_RESPONDING", "POWERED_DOWN", "POWERING_DOWN", "POWERING_UP", "REBOOT_REQUESTED", "FAIL"}
)


class JobState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    COMPLETING = "COMPLETING"
    CONFIGURING = "CONFIGURING"
    REQUEUED = "REQUEUED"
    REQUEUE_HOLD = "REQUEUE_HOLD"
    REQUEUE_FED = "REQUEUE_FED"
    RESIZING = "RESIZING"
    SIGNALING = "SIGNALING"
    STAGE_OUT = "STAGE_OUT"
    STOPPED = "STOPPED"
    RESV_DEL_HOLD = "RESV_DEL_HOLD"
    SPECIAL_EXIT = "SPECIAL_EXIT"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    REVOKED = "REVOKED"
    UNKNOWN = "UNKNOWN"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def is_pending(self) -> bool:
        return self in _WAITING

    @classmethod
    def parse(cls, text: str) -> JobState:
        """``CANCELLED by 0`` -> CANCELLED; unknown words -> UNKNOWN (Slurm adds states over time)."""
        word = text.split(" ", 1)[0].strip().upper()
        try:
            return cls(word)
        except ValueError:
            return cls.UNKNOWN


_TERMINAL = frozenset(
    {
        JobState.COMPLETED,
        JobState.CANCELLED,
        JobState.FAILED,
        JobState.TIMEOUT,
        JobState.NODE_FAIL,
        JobState.PREEMPTED,
        JobState.BOOT_FAIL,
        JobState.DEADLINE,
        JobState.OUT_OF_MEMORY,
        JobState.REVOKED,
    }
)
_WAITING = frozenset({JobState.PENDING, JobState.REQUEUED, JobState.REQUEUE_HOLD, JobState.REQUEUE_FED})


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    state: str  # Slurm's base state, lower case: idle, mixed, allocated, down, future, unknown
    flags: frozenset[str] = frozenset()  # DRAIN, NOT_RESPONDING, COMPLETING, ...
    partitions: tuple[str, ...] = ()
    gpus_total: int = 0
    gpus_alloc: int = 0
    gpu_type: str | None = None
    features: tuple[str, ...] = ()
    cpus_total: int = 0
    cpus_alloc: int = 0
    memory_mb: int = 0
    memory_alloc_mb: int = 0
    address: str = ""
    reason: str = ""
    switch: str | None = None  # leaf switch, filled from the topology
    # gres/shard (several jobs on one GPU): shards configured and in use, the GPUs (indices) that hold
    # shards in use, and the GPUs handed out whole (a GPU serves either shards or one whole-GPU job)
    shards_total: int = 0
    shards_alloc: int = 0
    shard_gpus: tuple[int, ...] = ()
    whole_gpus: tuple[int, ...] = ()

    @property
    def gpus_free(self) -> int:
        """GPUs a whole-GPU job could take now: neither allocated nor serving shards."""
        busy = self.gpus_alloc + len(self.shard_gpus)
        return max(self.gpus_total - busy, 0) if self.available else 0

    @property
    def shards_per_gpu(self) -> int:
        """Shards each GPU is cut into (0: the node has no shards)."""
        return self.shards_total // self.gpus_total if self.gpus_total else 0

    @property
    def available(self) -> bool:
        """Up, responding and not draining: new work may land here. ``idle*`` is not available."""
        return self.state in ("idle", "mixed", "allocated") and not (self.flags & UNAVAILABLE_FLAGS)

    @property
    def display_state(self) -> str:
        """The state as ``sinfo`` prints it: ``idle``, ``idle*``, ``drained``, ``draining``, ``down*``."""
        if "DRAIN" in self.flags:
            base = "drained" if self.state == "idle" else "draining"
        else:
            base = {"mixed": "mix", "allocated": "alloc"}.get(self.state, self.state)
        return base + ("*" if "NOT_RESPONDING" in self.flags else "")


class Job(msgspec.Struct, frozen=True):
    """One job (or array task) as seen at one moment. A frozen msgspec Struct, not a dataclass:
    ``hpcserve ps`` builds 10,000 of these per call, and a Struct is built 20x faster than a frozen
    dataclass and encoded to JSON in C."""

    id: str  # as Slurm prints it: "123", or "123_4" for an array task
    job_id: int  # the unique numeric id (scancel, sacct, scontrol accept it)
    name: str
    user: str
    account: str
    partition: str
    state: JobState
    num_nodes: int
    nodes: tuple[str, ...] = ()
    gpus: int = 0  # total over the job, requested when pending, allocated when running
    qos: str = ""
    submit: datetime | None = None
    start: datetime | None = None
    time_limit_s: int | None = None  # None: UNLIMITED
    reason: str = ""
    comment: str = ""
    tag: str | None = None  # hpcserve's own marker from the comment: see tag_of()
    wait_s: float | None = None  # seconds queued when observed: until start, or until then if pending
    # from the service's GPU telemetry, for ``hpcserve ps`` only (None: no telemetry for this job)
    gpu_util_pct: float | None = None  # the newest readings, averaged over the job's GPUs
    idle: bool | None = None  # flagged idle by the service's policy (``hpcserve idle``)
    shards: int = 0  # gres/shard units over the job (parts of a GPU: ``serving.shards_per_gpu`` make one)


def tag_of(comment: str) -> str | None:
    """hpcserve's marker, carried in ``--comment`` (``hpcserve:replica:<deployment>:<n>``), or None.
    hpcserve writes it on one printable line: a comment with a newline, tab or separator is never a tag."""
    return comment if comment.startswith(TAG_PREFIX) and comment.isprintable() else None


def wait_of(state: JobState, submit: datetime | None, start: datetime | None, now: datetime) -> float | None:
    """Seconds a job spent queued as of ``now``: until it started, or until ``now`` while it waits."""
    if submit is None:
        return None
    end = start if start is not None and not state.is_pending else now
    return round(max((end - submit).total_seconds(), 0.0), 1)


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    nodes: tuple[str, ...]
    state: str = "UP"
    default: bool = False
    max_time_s: int | None = None  # None: UNLIMITED
    default_time_s: int | None = None
    priority_tier: int = 1
    preempt_mode: str = ""
    total_gpus: int = 0


@dataclass(frozen=True, slots=True)
class Switch:
    name: str
    level: int
    nodes: tuple[str, ...] = ()
    switches: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Topology:
    switches: tuple[Switch, ...] = ()

    @property
    def leaves(self) -> tuple[Switch, ...]:
        return tuple(s for s in self.switches if s.level == 0)

    def leaf_of(self, node: str) -> str | None:
        return self.leaf_map().get(node)

    def leaf_map(self) -> dict[str, str]:
        return {n: leaf.name for leaf in self.leaves for n in leaf.nodes}


@dataclass(frozen=True, slots=True)
class AccountingRecord:
    """One job (not step) as ``sacct`` reports it."""

    job_id: str
    name: str
    user: str
    account: str
    partition: str
    state: JobState
    exit_code: str
    nodes: tuple[str, ...]
    gpus: int
    submit: datetime | None
    start: datetime | None
    end: datetime | None
    elapsed_s: int


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    at: datetime
    nodes: tuple[Node, ...]
    jobs: tuple[Job, ...]
    partitions: tuple[Partition, ...]
    topology: Topology = field(default_factory=Topology)

    def node(self, name: str) -> Node | None:
        return next((n for n in self.nodes if n.name == name), None)

    def partition(self, name: str) -> Partition | None:
        return next((p for p in self.partitions if p.name == name), None)


def with_switches(nodes: Iterable[Node], topology: Topology) -> tuple[Node, ...]:
    """Nodes with their leaf switch filled in from the topology."""
    leaf = topology.leaf_map()
    return tuple(dataclasses.replace(n, switch=leaf.get(n.name, n.switch)) for n in nodes)
