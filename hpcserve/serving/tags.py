"""hpcserve's marker on replica jobs, ``hpcserve:replica:<deployment>:<index>`` in ``--comment``: how the
reconciler, the planner and the simulator recognise a replica among Slurm's jobs; and the stored form of a
replica's secret (a tag alone proves nothing: anyone may write it). No I/O, no heavy imports."""

from __future__ import annotations

import hashlib

from hpcserve.model.cluster import TAG_PREFIX

REPLICA_KIND = "replica"


def replica_tag(deployment: str, index: int) -> str:
    return f"{TAG_PREFIX}{REPLICA_KIND}:{deployment}:{index}"


def parse_replica_tag(tag: str | None) -> tuple[str, int] | None:
    """``hpcserve:replica:<deployment>:<index>`` -> (deployment, index); anything else -> None."""
    if not tag or not tag.startswith(f"{TAG_PREFIX}{REPLICA_KIND}:"):
        return None
    deployment, _, index = tag.removeprefix(f"{TAG_PREFIX}{REPLICA_KIND}:").rpartition(":")
    return (deployment, int(index)) if deployment and index.isdigit() else None


def secret_hash(secret: str) -> str:
    """What the replicas table keeps of a replica's secret (``replicas.secret_hash``): its sha256, in hex."""
    return hashlib.sha256(secret.encode()).hexdigest()
