"""What a submission asks for (``JobRequest``) and what it becomes once policy and placement have decided
(``ResolvedJob``). Both are plain values: the template path and the submitit path share them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from hpcserve.config.policy import JobClassName
from hpcserve.model.cluster import TAG_PREFIX


def seconds_to_slurm(seconds: int) -> str:
    """Seconds -> ``D-HH:MM:SS``, the form sbatch --time takes."""
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"


def make_tag(kind: str, name: str) -> str:
    """hpcserve's marker for ``--comment``: ``hpcserve:<kind>:<name>``; unsafe characters become ``_``."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or "job"
    return f"{TAG_PREFIX}{kind}:{safe}"


@dataclass(frozen=True, slots=True)
class JobRequest:
    """A user's request, before policy and placement. ``None`` means "use the class default"."""

    job_class: JobClassName
    name: str
    user: str
    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int | None = None
    time_s: int | None = None
    array: str | None = None  # sbatch --array syntax, e.g. "0-9" or "0-99%10"
    account: str | None = None
    output: str | None = None  # sbatch --output pattern, e.g. "logs/%x-%j.out"
    hold: bool = False  # submit held (scontrol release starts it)
    # part of a GPU instead of whole ones (gpus_per_node 0): ``shard:N`` (gres/shard) or ``gpu:1g.10gb:1``
    # (a MIG profile's typed GRES)
    gres: str | None = None

    @property
    def gpus(self) -> int:
        """GPUs the whole job holds (per array task)."""
        return self.nodes * self.gpus_per_node

    @property
    def gres_option(self) -> str:
        """sbatch's ``--gres`` value: the GPU part asked for, whole GPUs, or ``none``."""
        return self.gres or (f"gpu:{self.gpus_per_node}" if self.gpus_per_node else "none")


@dataclass(frozen=True, slots=True)
class ResolvedJob:
    """A request after the policy check and placement: everything sbatch needs, nothing left to decide."""

    request: JobRequest
    partition: str
    qos: str
    time_s: int
    preemptible: bool
    grace_s: int
    tag: str
    nodelist: tuple[str, ...] = ()  # chosen by placement, or empty to let Slurm choose
    switches: str | None = None  # sbatch --switches value, e.g. "1@00:10:00"
    constraint: str | None = None  # sbatch --constraint, e.g. the fabric island's feature
    env: Mapping[str, str] = field(default_factory=dict)  # exported in the job, e.g. the NCCL settings
    requeue: bool = False  # requeue after a node failure even if not preemptible (serving replicas)

    def sbatch_args(self) -> list[str]:
        """The sbatch options as argv items (``--opt=value``: no shell ever sees them)."""
        from hpcserve import hostlists

        req = self.request
        args = [
            f"--job-name={req.name}",
            f"--partition={self.partition}",
            f"--qos={self.qos}",
            f"--nodes={req.nodes}",
            f"--ntasks-per-node={req.tasks_per_node}",
            f"--time={seconds_to_slurm(self.time_s)}",
            f"--comment={self.tag}",
        ]
        # "none" overrides a script's own #SBATCH --gres, so a job never holds GPUs the policy did not count
        args.append(f"--gres={req.gres_option}")
        if req.cpus_per_task:
            args.append(f"--cpus-per-task={req.cpus_per_task}")
        if req.account:
            args.append(f"--account={req.account}")
        if req.array:
            args.append(f"--array={req.array}")
        if req.output:
            args.append(f"--output={req.output}")
        if req.hold:
            args.append("--hold")
        if self.nodelist:
            args.append(f"--nodelist={hostlists.collect(self.nodelist)}")
        if self.switches:
            args.append(f"--switches={self.switches}")
        if self.constraint:
            args.append(f"--constraint={self.constraint}")
        if self.preemptible:
            # The batch shell gets USR2 grace_s before the end, checkpoints, and the job is requeued.
            args.append(f"--signal=B:USR2@{self.grace_s}")
        if self.preemptible or self.requeue:
            args.append("--requeue")
        return args
