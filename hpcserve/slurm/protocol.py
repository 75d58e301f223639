"""The one interface every part of hpcserve uses to talk to Slurm."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Iterator
    from datetime import datetime

    from hpcserve.model.usage import GpuAllocation
    from hpcserve.slurm.models import AccountingRecord, ClusterSnapshot, Job, Node, Partition, Topology
    from hpcserve.slurm.runner import CommandResult


class CommandRunner(Protocol):
    """Runs argv lists (hpcserve.slurm.runner.SubprocessRunner). Injected into clients, so the process layer
    is swappable."""

    def __call__(self, argv: Sequence[str], *, timeout: float, stdin: str | None = None) -> CommandResult: ...

    def lines(
        self, argv: Sequence[str], *, timeout: float, env: Mapping[str, str | None] | None = None
    ) -> Iterator[str]: ...


@dataclass(frozen=True, slots=True)
class JobFilter:
    """Which jobs to list. Empty fields match everything; filters are passed on to Slurm."""

    user: str | None = None
    states: tuple[str, ...] = ()
    partitions: tuple[str, ...] = ()
    job_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Ping:
    ok: bool
    detail: str


@runtime_checkable
class SlurmReader(Protocol):
    """Reads: what every backend must provide."""

    def ping(self) -> Ping: ...

    def jobs(self, filt: JobFilter | None = None) -> list[Job]: ...

    def nodes(self) -> list[Node]: ...

    def partitions(self) -> list[Partition]: ...

    def topology(self) -> Topology: ...

    def snapshot(self) -> ClusterSnapshot: ...


@runtime_checkable
class SlurmClient(SlurmReader, Protocol):
    """Reads plus the writes hpcserve needs (submission, cancellation, accounting)."""

    def accounting(self, job_ids: Iterable[str]) -> list[AccountingRecord]: ...

    def submit(self, script: str, sbatch_args: Sequence[str] = ()) -> str: ...

    def cancel(self, job_ids: Iterable[str], *, signal: str | None = None) -> None: ...


@runtime_checkable
class UsageReader(Protocol):
    """Accounting over a time window (``hpcserve usage``): one sacct read, every allocation in it."""

    def gpu_allocations(self, since: datetime, until: datetime, user: str | None) -> list[GpuAllocation]: ...


@runtime_checkable
class SlurmOperator(SlurmClient, Protocol):
    """The operator writes that rebalancing needs (slurmctld admin rights). A protocol of its own, so a
    read-only backend still is a ``SlurmClient``; ``CliSlurmClient`` provides both."""

    def update_partition_nodes(self, partition: str, nodes: Iterable[str]) -> None: ...

    def drain(self, nodes: Iterable[str], reason: str) -> None: ...

    def resume(self, nodes: Iterable[str]) -> None: ...

    def requeue(self, job_ids: Iterable[str]) -> None: ...

    def signal(self, job_ids: Iterable[str], signal: str, *, batch: bool) -> None: ...

    def batch_script(self, job_id: str) -> str: ...
