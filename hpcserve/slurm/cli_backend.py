"""The complete Slurm backend: Slurm's own commands, run as argv lists by an injected runner.

Each method builds an argv list, runs it once through the runner and hands the text to a pure parser
(hpcserve.slurm.parsers). A snapshot is four cheap reads: squeue, sinfo, two scontrol calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime

from hpcserve.errors import SlurmCommandError
from hpcserve.slurm import parsers
from hpcserve.slurm.commands import sacct_argv, scancel_argv, squeue_argv
from hpcserve.slurm.models import (
    AccountingRecord,
    ClusterSnapshot,
    Job,
    Node,
    Partition,
    Topology,
    with_switches,
)
from hpcserve.slurm.protocol import CommandRunner, JobFilter, Ping
from hpcserve.slurm.runner import DEFAULT_TIMEOUT_S, SubprocessRunner


def _utcnow() -> datetime:
    return datetime.now(UTC)


class CliSlurmClient:
    """SlurmClient over squeue, sinfo, scontrol, sacct, sbatch and scancel."""

    def __init__(
        self,
        runner: CommandRunner | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._runner: CommandRunner = runner or SubprocessRunner()
        self._timeout = timeout
        self._clock = clock

    def _run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        return self._runner(argv, timeout=self._timeout, stdin=stdin).stdout

    # ---------------------------------------------------------------------------------------- reads
    def ping(self) -> Ping:
        try:
            out = self._run(["scontrol", "ping"]).strip()
        except SlurmCommandError as exc:  # scontrol prints "... is DOWN" on stdout and exits 1
            return Ping(False, exc.stderr or "slurmctld does not answer `scontrol ping`")
        return Ping("DOWN" not in out, out)

    def jobs(self, filt: JobFilter | None = None) -> list[Job]:
        return list(self.iter_jobs(filt))

    def iter_jobs(self, filt: JobFilter | None = None) -> Iterator[Job]:
        """Start squeue now; parse its lines as it prints them."""
        lines = self._runner.lines(squeue_argv(filt), timeout=self._timeout)
        return _tolerate_unknown_ids(parsers.iter_squeue(lines, self._clock()))

    def nodes(self) -> list[Node]:
        return parsers.parse_sinfo_json(self._run(["sinfo", "--json"]))

    def partitions(self) -> list[Partition]:
        return parsers.parse_partitions(self._run(["scontrol", "show", "partition", "-o"]))

    def topology(self) -> Topology:
        try:
            return parsers.parse_topology(self._run(["scontrol", "show", "topology"]))
        except SlurmCommandError as exc:
            if "No topology" in exc.stderr or "topology/none" in exc.stderr:
                return Topology()
            raise

    def snapshot(self) -> ClusterSnapshot:
        at = self._clock()
        topology = self.topology()
        return ClusterSnapshot(
            at=at,
            nodes=with_switches(self.nodes(), topology),
            jobs=tuple(self.jobs()),
            partitions=tuple(self.partitions()),
            topology=topology,
        )

    def accounting(self, job_ids: Iterable[str]) -> list[AccountingRecord]:
        """Jobs as slurmdbd records them (about 0.5 s behind slurmctld)."""
        return parsers.parse_sacct(self._run(sacct_argv(job_ids)))

    # ---------------------------------------------------------------------------------------- writes
    def submit(self, script: str, sbatch_args: Sequence[str] = ()) -> str:
        """``sbatch --parsable ARGS`` with the script on stdin; returns the job id."""
        return parsers.parse_sbatch(self._run(["sbatch", "--parsable", *sbatch_args], stdin=script))

    def cancel(self, job_ids: Iterable[str], *, signal: str | None = None) -> None:
        self._run(scancel_argv(job_ids, signal))


def _tolerate_unknown_ids(jobs: Iterator[Job]) -> Iterator[Job]:
    """squeue -j with ids that slurmctld no longer holds exits 1 ("Invalid job id"): that is no jobs."""
    try:
        yield from jobs
    except SlurmCommandError as exc:
        if "Invalid job id" not in exc.stderr:
            raise
