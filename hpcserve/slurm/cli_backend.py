"""The complete Slurm backend: Slurm's own commands, run as argv lists by an injected runner.

Each method builds an argv list, runs it once through the runner and hands the text to a pure parser
(hpcserve.slurm.parsers). A snapshot is four cheap reads: squeue, sinfo, two scontrol calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime

from hpcserve.errors import SlurmCommandError
from hpcserve.model.usage import GpuAllocation
from hpcserve.slurm import parsers
from hpcserve.slurm.commands import (
    batch_script_argv,
    new_nonce,
    pin_job_argv,
    release_argv,
    requeue_argv,
    sacct_argv,
    sacct_usage_argv,
    scancel_argv,
    signal_argv,
    squeue_argv,
    squeue_env,
    update_nodes_argv,
    update_partition_argv,
)
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
    """SlurmClient (and SlurmOperator) over squeue, sinfo, scontrol, sacct, sbatch and scancel."""

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
        lines = self._runner.lines(squeue_argv(filt), timeout=self._timeout, env=squeue_env())
        return _tolerate_unknown_ids(parsers.iter_squeue(lines, self._clock()))

    def nodes(self) -> list[Node]:
        text = self._run(["sinfo", "--json"])
        nodes = parsers.parse_sinfo_json(text)
        if not nodes and _reported_errors(text):
            # sinfo --json exits 0 with no nodes and an "errors" list when slurmctld does not answer
            problem = "sinfo: error: Unable to contact slurm controller (sinfo --json listed only errors)"
            raise SlurmCommandError(["sinfo", "--json"], 1, problem)
        return nodes

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
        nonce = new_nonce()
        return parsers.parse_sacct(self._run(sacct_argv(job_ids, nonce)), nonce)

    def gpu_allocations(self, since: datetime, until: datetime, user: str | None) -> list[GpuAllocation]:
        """Every allocation that ran in ``[since, until]``, in one sacct read: ``user``'s only, or (None)
        every user's (``--allusers``)."""
        nonce = new_nonce()
        argv = sacct_usage_argv(_sacct_time(since), _sacct_time(until), user, nonce)
        return parsers.parse_sacct_usage(self._run(argv), nonce)

    # ---------------------------------------------------------------------------------------- writes
    def submit(self, script: str, sbatch_args: Sequence[str] = ()) -> str:
        """``sbatch --parsable ARGS`` with the script on stdin; returns the job id."""
        return parsers.parse_sbatch(self._run(["sbatch", "--parsable", *sbatch_args], stdin=script))

    def cancel(self, job_ids: Iterable[str], *, signal: str | None = None) -> None:
        self._run(scancel_argv(job_ids, signal))

    # ------------------------------------------------------------------------ operator writes (admin)
    def update_partition_nodes(self, partition: str, nodes: Iterable[str]) -> None:
        """Set the partition's whole node list (lost on ``scontrol reconfigure``: re-assert it)."""
        self._run(update_partition_argv(partition, nodes))

    def drain(self, nodes: Iterable[str], reason: str) -> None:
        """DRAIN: running jobs go on, nothing new starts. Draining a drained node again is fine."""
        self._run(update_nodes_argv(nodes, "DRAIN", reason))

    def resume(self, nodes: Iterable[str]) -> None:
        """RESUME drained nodes; a node that is not drained is left as it is (Slurm refuses it)."""
        try:
            self._run(update_nodes_argv(nodes, "RESUME"))
        except SlurmCommandError as exc:
            if "Invalid node state specified" not in exc.stderr:
                raise

    def requeue(self, job_ids: Iterable[str]) -> None:
        self._run(requeue_argv(job_ids))

    def pin_job(self, job_id: str, nodes: Iterable[str]) -> None:
        """Let a pending job start only on ``nodes`` (``scontrol update ... ReqNodeList``)."""
        self._run(pin_job_argv(job_id, nodes))

    def release(self, job_ids: Iterable[str]) -> None:
        """Let held jobs start (``scontrol release``)."""
        self._run(release_argv(job_ids))

    def signal(self, job_ids: Iterable[str], signal: str, *, batch: bool) -> None:
        """Send ``signal`` to the jobs' steps, or (``batch``) to their batch shells only."""
        self._run(signal_argv(job_ids, signal, batch=batch))

    def batch_script(self, job_id: str) -> str:
        return self._run(batch_script_argv(job_id))


def _sacct_time(at: datetime) -> str:
    """sacct reads times in its own local time zone, to the second."""
    return at.astimezone().strftime("%Y-%m-%dT%H:%M:%S")


def _reported_errors(text: str) -> bool:
    import json

    try:
        return bool(json.loads(text).get("errors"))
    except (ValueError, AttributeError):
        return False


def _tolerate_unknown_ids(jobs: Iterator[Job]) -> Iterator[Job]:
    """squeue -j with ids that slurmctld no longer holds exits 1 ("Invalid job id"): that is no jobs."""
    try:
        yield from jobs
    except SlurmCommandError as exc:
        if "Invalid job id" not in exc.stderr:
            raise
