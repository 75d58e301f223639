"""The owner's GPU limits for served replicas: pure, no store and no Slurm (the caller counts, this decides).

A deployment's replicas count against its OWNER's inference class limits, whoever asks: each replica must
fit ``max_gpus_per_job``; the replicas it asks for, plus what the owner's other deployments want and the
owner's own GPU jobs in the inference partition, must fit ``max_gpus_per_user``. A refusal names the rule
(``policy classes.inference.max_gpus_per_user: ...``), like every other policy check.

A replica on part of a GPU (``gpu_fraction``) counts as that part, as the shards it takes (0.25 for a
quarter of a GPU cut in 4 shards), and so does a job's GPU shards in squeue (``jobs.policy.part_gpus``,
``gpus_in_use``). A pool's replicas are counted once, on the pool's row: its members have none.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hpcserve.config.policy import JobClassName
from hpcserve.jobs.policy import PolicyViolation, part_gpus, shard_gpus
from hpcserve.serving.pools import pool_of

if TYPE_CHECKING:
    from hpcserve.config.policy import Policy
    from hpcserve.model.cluster import Job
    from hpcserve.store.records import Deployment

INFERENCE = JobClassName.INFERENCE.value


@dataclass(frozen=True, slots=True)
class OwnerUsage:
    """GPUs an owner holds or wants besides the deployment in question."""

    deployments: float  # other live deployments: desired (or min, when higher) replicas x GPUs per replica
    jobs: float  # the owner's own queued and running GPU jobs in the inference partition (not replicas)

    @property
    def total(self) -> float:
        return self.deployments + self.jobs


def replica_gpus(spec: Mapping[str, object], shards_per_gpu: int = 4) -> int | float:
    """GPUs one replica of a stored spec holds: GPUs per node x nodes, or the part of one GPU its
    ``gpu_fraction`` takes (a whole number as an int)."""
    gpus, nodes = spec.get("gpus_per_replica", 1), spec.get("nodes_per_replica", 1)
    whole = int(gpus) * int(nodes) if isinstance(gpus, int) and isinstance(nodes, int) else 0
    fraction = spec.get("gpu_fraction")
    share = part_gpus(whole, float(fraction) if isinstance(fraction, int | float) else None, shards_per_gpu)
    return int(share) if share.is_integer() else share


def wanted_replicas(deployment: Deployment) -> int:
    """What a deployment keeps: its desired count, never below its minimum; none once deleted."""
    if deployment.deleted:
        return 0
    low = deployment.spec.get("min_replicas", 0)
    return max(deployment.desired_replicas, low if isinstance(low, int) else 0)


def owner_usage(
    owner: str, exclude: str | None, deployments: Iterable[Deployment], jobs: Iterable[Job],
    replica_job_ids: Iterable[str], shards_per_gpu: int = 4,
) -> OwnerUsage:  # fmt: skip
    """What ``owner`` already holds or wants, leaving out deployment ``exclude``. ``jobs``: the owner's
    inference-partition jobs; those the service submitted as replicas (``replica_job_ids``) are already
    counted with their deployments. A pool member wants nothing of its own: its pool's row holds the
    replicas (its minimum is the most its members ask for)."""
    theirs = [d for d in deployments if d.owner == owner and d.name != exclude and pool_of(d.spec) is None]
    wanted = sum(wanted_replicas(d) * replica_gpus(d.spec, shards_per_gpu) for d in theirs)
    replicas = set(replica_job_ids)
    own_jobs = sum(j.gpus + shard_gpus(j.shards, shards_per_gpu) for j in jobs
                   if j.user == owner and not j.state.is_terminal
                   and str(j.job_id) not in replicas and j.id not in replicas)  # fmt: skip
    return OwnerUsage(wanted, own_jobs)


def check_replicas(policy: Policy, owner: str, per_replica: float, replicas: int, usage: OwnerUsage) -> None:
    """Refuse (``PolicyViolation``) ``replicas`` replicas of ``per_replica`` GPUs for ``owner``."""
    rules = policy.for_class(JobClassName.INFERENCE)
    if per_replica > rules.max_gpus_per_job:
        raise PolicyViolation(
            INFERENCE, "max_gpus_per_job",
            f"a replica of {per_replica:g} GPUs is more than {rules.max_gpus_per_job} per {INFERENCE} job",
            f"at most {rules.max_gpus_per_job} GPUs per replica (gpus_per_replica x nodes_per_replica)",
        )  # fmt: skip
    asked = per_replica * replicas
    if usage.total + asked > rules.max_gpus_per_user + 1e-9:
        raise PolicyViolation(
            INFERENCE, "max_gpus_per_user",
            f"{owner}'s deployments and jobs hold or want {usage.total:g} GPUs; {replicas} replicas x "
            f"{per_replica:g} GPUs = {asked:g} more would pass the limit of {rules.max_gpus_per_user}",
            "ask for fewer replicas, or scale down or remove another of your deployments",
        )  # fmt: skip
