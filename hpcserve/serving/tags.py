"""hpcserve's marker on replica jobs, ``hpcserve:replica:<deployment>:<index>`` in ``--comment``: how the
reconciler, the planner and the simulator recognise a replica among Slurm's jobs. No I/O, no heavy imports."""

from __future__ import annotations

from hpcserve.slurm.models import TAG_PREFIX

REPLICA_KIND = "replica"


def replica_tag(deployment: str, index: int) -> str:
    return f"{TAG_PREFIX}{REPLICA_KIND}:{deployment}:{index}"


def parse_replica_tag(tag: str | None) -> tuple[str, int] | None:
    """``hpcserve:replica:<deployment>:<index>`` -> (deployment, index); anything else -> None."""
    if not tag or not tag.startswith(f"{TAG_PREFIX}{REPLICA_KIND}:"):
        return None
    deployment, _, index = tag.removeprefix(f"{TAG_PREFIX}{REPLICA_KIND}:").rpartition(":")
    return (deployment, int(index)) if deployment and index.isdigit() else None
