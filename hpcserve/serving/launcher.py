"""Replica jobs: one Slurm job per replica, submitted through submitit to the inference partition.

Each job holds the replica's GPUs as GRES, carries ``hpcserve:replica:<deployment>:<index>`` in its
``--comment`` (how the reconciler finds it again), has a finite time limit, and is requeued if its node
fails. The policy's inference class decides partition, QoS and limits, like any other submission.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hpcserve.config.policy import JobClassName
from hpcserve.identity import current_user
from hpcserve.jobs.spec import JobRequest
from hpcserve.serving.replica import ReplicaMain
from hpcserve.serving.tags import REPLICA_KIND, replica_tag

if TYPE_CHECKING:
    from hpcserve.jobs.submit import Submitter
    from hpcserve.serving.spec import DeploymentSpec


def replica_request(spec: DeploymentSpec, index: int, user: str | None = None) -> JobRequest:
    from hpcserve.jobs.policy import time_option

    return JobRequest(
        job_class=JobClassName.INFERENCE,
        name=f"{spec.name}-r{index}",
        user=user or current_user(),
        partition=spec.partition,
        nodes=spec.nodes_per_replica,
        gpus_per_node=spec.gpus_per_replica,
        time_s=time_option(spec.time_limit) if spec.time_limit else None,
    )


def launch_replica(
    submitter: Submitter, spec: DeploymentSpec, index: int, replica_dir: Path, ready_timeout_s: float
) -> str:
    """Submit replica ``index`` of ``spec``; returns its Slurm job id."""
    main = ReplicaMain(spec.model_dump(mode="json"), index, str(replica_dir), ready_timeout_s)
    jobs, _ = submitter.submit_callable(
        replica_request(spec, index),
        main,
        (),
        replica_dir / spec.name / "%j",
        kind=REPLICA_KIND,
        tag=replica_tag(spec.name, index),
        requeue=True,
    )
    return str(jobs[0].job_id)
