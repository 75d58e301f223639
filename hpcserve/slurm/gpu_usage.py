"""slurmd's own GPU figures, the second source of GPU telemetry: ``gres/gpuutil`` and ``gres/gpumem`` in
sacct's ``TRESUsageInAve``. Pure: the argv to run and the parser of its output; the service's
``hpcserve.service.sacct_gpu`` runs it.

Slurm gathers them only where slurm.conf has ``AccountingStorageTRES=gres/gpu,gres/gpumem,gres/gpuutil`` and
``GresTypes=gpu`` with ``AutoDetect=nvml`` (the gpu/nvml plugin); elsewhere, the local cluster's fake GPUs
included, the fields are missing and nothing is read. slurmdbd records a step's usage when the step ends,
so each finished job gives one reading, dated at its end, of the job's GPU 0 slot (no device is named),
from its busiest step (the extern step holds no work, and a batch script that runs ``srun`` waits at 0%):
- ``util_pct``: gpu/nvml adds up the utilisation of a task's GPUs and TRESUsageInAve averages over the
  step's tasks, so the figure is divided by the step's GPUs per task (AllocTRES ``gres/gpu`` / NTasks),
  capped at 100;
- ``mem_used_bytes``: gres/gpumem, the task's GPUs' memory summed, averaged over tasks (with --noconvert,
  bytes). The device's total is not in sacct: 0.

Only Slurm's own fields are asked for (no job name or comment), so ``--parsable2`` ('|') is safe here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime

from hpcserve.model.telemetry import GpuSample
from hpcserve.slurm.timefmt import parse_timestamp

FIELDS = ("JobID", "User", "End", "NTasks", "AllocTRES", "TRESUsageInAve")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


@dataclass(frozen=True, slots=True)
class StepGpuUsage:
    """One finished step's GPU figures from sacct; ``user`` is the job's (steps carry none)."""

    job_id: str
    step: str
    user: str
    end: datetime
    gpuutil: float  # as Slurm reports it: summed over a task's GPUs, averaged over tasks
    gpumem_bytes: int
    gpus_per_task: float

    def sample(self) -> GpuSample:
        """The step as one reading of the job (see the module docstring for the arithmetic)."""
        util = min(self.gpuutil / max(self.gpus_per_task, 1.0), 100.0)
        return GpuSample(self.end, self.job_id, "", 0, round(util, 2), self.gpumem_bytes, 0, None, None)


def sacct_gpu_argv(since: str, until: str) -> list[str]:
    """Every job and step of every user that ended in ``[since, until]`` (sacct's local times)."""
    return ["sacct", "-n", "-P", "--noconvert", "--allusers", f"--format={','.join(FIELDS)}",
            f"--starttime={since}", f"--endtime={until}",
            "--state=CD,CA,F,TO,OOM,NF,PR"]  # fmt: skip


def parse_sacct_gpu(text: str) -> list[StepGpuUsage]:
    """The steps of ``sacct_gpu_argv``'s output that carry ``gres/gpuutil``; job lines give the user."""
    users: dict[str, str] = {}
    steps = []
    for fields in _rows(text):
        job_id, user, end, ntasks, alloc, usage = fields
        base, dot, step = job_id.partition(".")
        if not dot:
            users[base] = user
            continue
        found = _step(base, step, end, ntasks, alloc, usage)
        if found is not None:
            steps.append(found)
    return [_with_user(s, users.get(s.job_id, "")) for s in steps if users.get(s.job_id)]


def _rows(text: str) -> Iterator[list[str]]:
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) == len(FIELDS) and fields[0][:1].isdigit():
            yield fields


def _step(job_id: str, step: str, end: str, ntasks: str, alloc: str, usage: str) -> StepGpuUsage | None:
    used = tres(usage)
    at = parse_timestamp(end)
    util, mem = used.get("gres/gpuutil"), size_bytes(used.get("gres/gpumem", "0"))
    gpus = _number(tres(alloc).get("gres/gpu", ""))
    if util is None or at is None or mem is None or _number(util) is None or not gpus:
        return None
    per_task = gpus / max(int(ntasks) if ntasks.isdigit() else 1, 1)
    return StepGpuUsage(job_id, step, "", at, float(util), mem, per_task)


def _with_user(step: StepGpuUsage, user: str) -> StepGpuUsage:
    return replace(step, user=user)


def job_samples(steps: list[StepGpuUsage]) -> list[tuple[str, GpuSample]]:
    """One (user, reading) per job: its busiest step's figures, dated at its last step's end."""
    by_job: dict[str, list[StepGpuUsage]] = {}
    for step in steps:
        if step.step != "extern":
            by_job.setdefault(step.job_id, []).append(step)
    found = []
    for job_steps in by_job.values():
        busiest = max(job_steps, key=lambda s: s.sample().util_pct)
        last = max(s.end for s in job_steps)
        found.append((busiest.user, replace(busiest.sample(), at=last)))
    return found


def tres(text: str) -> dict[str, str]:
    """``cpu=00:01:00,gres/gpuutil=45,mem=1M`` -> {"cpu": "00:01:00", "gres/gpuutil": "45", ...}."""
    pairs = (item.partition("=") for item in text.split(",") if "=" in item)
    return {key.strip(): value.strip() for key, _, value in pairs}


def size_bytes(text: str) -> int | None:
    """sacct's sizes: ``40777023488`` (--noconvert) or ``38888M`` (1024-based) -> bytes; None if neither."""
    text = text.strip()
    scale = _UNITS.get(text[-1:].upper(), 1) if text else 1
    number = _number(text[:-1] if scale > 1 else text)
    return None if number is None or number < 0 else int(number * scale)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and value not in (float("inf"), float("-inf")) else None
