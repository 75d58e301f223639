"""torch.distributed's environment from Slurm's, inside a job (every rank computes the same rendezvous).

Runs on the compute node, so it stays light: no torch until :func:`init_process_group` is called, and the
hostlist is expanded in-process (python-hostlist), not with ``scontrol show hostnames``, which would cost
one slurmctld RPC per rank at start-up.

- ``MASTER_ADDR``: the first host of the step's node list (``SLURM_STEP_NODELIST``, else
  ``SLURM_JOB_NODELIST``). With Slurm's default block distribution rank 0 runs there.
- ``MASTER_PORT``: derived from the job id, so all ranks agree without talking, and two jobs sharing a node
  rarely collide. It lies in 15000-29999: unprivileged, below Linux's ephemeral range (32768-60999, where
  outgoing connections take their ports) and clear of Slurm's 6817-6820.
- ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``: ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``.
- ``LOCAL_WORLD_SIZE``: this node's entry of ``SLURM_STEP_TASKS_PER_NODE`` (``2(x3),1`` means 2,2,2,1).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from hpcserve import hostlists
from hpcserve.errors import HpcserveError
from hpcserve.jobs.wrapping import JobWrapper

PORT_BASE = 15000
PORT_SPAN = 15000
_TASKS_ITEM = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def master_port(job_id: str) -> int:
    """A port every rank of job ``job_id`` derives alike, in [PORT_BASE, PORT_BASE + PORT_SPAN)."""
    if not job_id.isdigit():
        raise HpcserveError(f"SLURM_JOB_ID={job_id!r} is not a number: cannot derive MASTER_PORT")
    return PORT_BASE + int(job_id) % PORT_SPAN


def tasks_per_node(text: str) -> list[int]:
    """Slurm's compressed task counts, ``2(x3),1`` -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in filter(None, text.split(",")):
        match = _TASKS_ITEM.match(item.strip())
        if match is None:
            raise HpcserveError(f"cannot read tasks per node {text!r} (expected e.g. 2(x3),1)")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def _first(env: Mapping[str, str], *names: str) -> str | None:
    return next((env[name] for name in names if env.get(name)), None)


def _local_world_size(env: Mapping[str, str]) -> int:
    text = _first(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if text is None:
        return int(env.get("SLURM_NTASKS_PER_NODE") or 1)
    counts = tasks_per_node(text)
    node = int(env.get("SLURM_NODEID") or 0)
    return counts[node] if node < len(counts) else counts[-1]


def torch_env_from(slurm_env: Mapping[str, str]) -> dict[str, str]:
    """The env:// rendezvous variables for this task, computed from Slurm's variables (pure)."""
    nodelist = _first(slurm_env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    job_id = _first(slurm_env, "SLURM_JOB_ID", "SLURM_JOBID")
    if nodelist is None or job_id is None:
        raise HpcserveError(
            "not inside a Slurm job (SLURM_JOB_ID or SLURM_JOB_NODELIST unset): "
            "torch_env() only works in a job's task (srun)"
        )
    hosts = hostlists.expand(nodelist)
    if not hosts:
        raise HpcserveError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    return {
        "MASTER_ADDR": hosts[0],
        "MASTER_PORT": str(master_port(job_id)),
        "RANK": slurm_env.get("SLURM_PROCID") or "0",
        "WORLD_SIZE": _first(slurm_env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or "1",
        "LOCAL_RANK": slurm_env.get("SLURM_LOCALID") or "0",
        "LOCAL_WORLD_SIZE": str(_local_world_size(slurm_env)),
    }


def torch_env() -> dict[str, str]:
    """:func:`torch_env_from` for this process's environment."""
    return torch_env_from(os.environ)


def init_process_group(backend: str | None = None, *, timeout_s: float = 300.0) -> dict[str, str]:
    """Export :func:`torch_env` into ``os.environ`` and join the job's process group (``env://``).

    ``backend`` defaults to ``nccl`` when CUDA is available (each rank then takes GPU ``LOCAL_RANK``
    modulo the visible devices) and ``gloo`` otherwise. Returns the variables it set.
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    env = torch_env()
    os.environ.update(env)
    cuda = torch.cuda.is_available()
    if cuda and (backend or "nccl") == "nccl":
        torch.cuda.set_device(int(env["LOCAL_RANK"]) % torch.cuda.device_count())
    dist.init_process_group(
        backend=backend or ("nccl" if cuda else "gloo"),
        init_method="env://",
        timeout=timedelta(seconds=timeout_s),
    )
    return env


class WithTorchEnv(JobWrapper):
    """``fn`` called with the torch.distributed variables already in ``os.environ``, so plain
    ``torch.distributed.init_process_group("gloo")`` (env://) works in every rank of a multi-task job.

    A ``checkpoint`` method of ``fn`` (submitit's ``Checkpointable``) stays visible to submitit's signal
    handler, and the call it returns for the requeued job is wrapped again.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        os.environ.update(torch_env())
        return self.fn(*args, **kwargs)
